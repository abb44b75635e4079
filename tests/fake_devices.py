"""Fake accelerator devices on a CPU-only torch: tensors that *say* they are on ``cuda:0`` (or ``cuda:1``) and hold
real CPU data, with eager PyTorch's device rules enforced.

``torch._subclasses.fake_tensor.FakeTensorMode`` checks devices too, but its tensors have no values: every
data-dependent step (``.item()``, ``.tolist()``, ``nonzero``, ``if tensor.all():``) stops it, and on a CPU-only build
it cannot even index a fake CUDA tensor with CPU indices (it tries to move them to a real CUDA device). The paths
under test are full of such steps (``PrefixCache.keep``, ``check_finite_logits``, the hooks' position lists), so they
could only be tested piecemeal. Here instead:

* :class:`OnDevice` wraps a real CPU tensor and advertises another device (``tensor.device`` is ``cuda:0``);
* :class:`FakeDevices` is a dispatch mode: inside it a factory call with ``device="cuda"`` (``torch.arange``,
  ``torch.zeros``, ``torch.tensor``, ...) or ``.to("cuda")`` gives an :class:`OnDevice` tensor, and every operation
  is checked as eager PyTorch checks it on a real GPU, then computed on the CPU (so the numbers are exactly the CPU
  numbers):

  - all tensor operands on one device, except CPU 0-dim tensors (scalars), which may meet any device;
  - the indices of an indexing op on the CPU or on the indexed tensor's device;
  - ``copy_`` (``x[...] = y``) and ``.to()`` between any devices;
  - otherwise :class:`DeviceMismatch` (a ``RuntimeError``, as eager's "Expected all tensors to be on the same
    device").

  ``.numpy()`` of an :class:`OnDevice` tensor raises ``TypeError`` as on a real GPU (PyTorch checks the advertised
  device); ``.cpu()`` gives the plain CPU tensor.

:func:`to_device` moves a model's parameters and buffers (inside the mode), :func:`split` spreads a model's layers
over two fake devices with accelerate's hooks (what ``device_map="auto"`` does over two GPUs).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

__all__ = ["OnDevice", "FakeDevices", "DeviceMismatch", "to_device", "split", "device_of"]


class DeviceMismatch(RuntimeError):
    """Tensors on different devices met in one operation (eager PyTorch raises RuntimeError there)."""


NAME = "fakegpu"
_INSTALLED = False


class _Backend:
    """The backend module of the renamed PrivateUse1 device: present, but not "available", so that nothing else in
    the process (transformers, accelerate) picks it as a default accelerator."""

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return False

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 2

    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass

    def synchronize(self, device=None) -> None:
        """What :func:`helpers.core.models.synchronize` calls for this device type; tests record it."""
        for callback in SYNCHRONIZE:
            callback(device)


SYNCHRONIZE: list = []  # callbacks of torch.fakegpu.synchronize()


def install() -> None:
    """Register the fake device type (once per process): PyTorch's PrivateUse1 slot renamed to ``fakegpu``, with a
    Python device guard. A CPU-only build has no CUDA device guard (indexing, ``.tolist()`` and autograd on a tensor
    that advertises ``cuda`` stop in C++), so the fake devices are ``fakegpu:0`` and ``fakegpu:1``; the code under
    test never names a device type, it takes the model's."""
    global _INSTALLED
    if _INSTALLED:
        return
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend, _DummyPrivateUse1Hook

    class Hook(_DummyPrivateUse1Hook):
        def is_available(self) -> bool:
            return False

    _setup_privateuseone_for_python_backend(NAME, backend_module=_Backend(), hook=Hook())
    _INSTALLED = True


def _norm(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        return torch.device(device.type, 0)
    return device


def _fake(device) -> bool:
    return device is not None and torch.device(device).type == NAME


class OnDevice(torch.Tensor):
    """A CPU tensor (``elem``) that advertises a fake accelerator device."""

    elem: torch.Tensor
    __slots__ = ["elem"]

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device):
        install()
        if isinstance(elem, OnDevice):
            raise TypeError("OnDevice wraps a plain CPU tensor")
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=_norm(device), requires_grad=False,
        )
        r.elem = elem
        return r

    def __repr__(self, **kwargs):
        return f"OnDevice({self.elem!r}, device='{self.device}')"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:  # a real device tensor's .tolist() copies to the host; so does this
            return args[0].elem.tolist()
        if func is torch.Tensor.numpy:  # as on a real device
            raise TypeError(f"can't convert {args[0].device} device type tensor to numpy. Use Tensor.cpu() to copy "
                            "the tensor to host memory first.")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def device_of(t) -> torch.device:
    return t.device if isinstance(t, OnDevice) else torch.device("cpu") if not isinstance(t, torch.Tensor) else t.device


_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
              aten._unsafe_index.Tensor, aten._unsafe_index_put.default}
_ANY_DEVICE_OPS = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default, aten._copy_from_and_resize.default}


def _common(func, tensors) -> torch.device:
    """The device an op runs on, by eager PyTorch's rule; DeviceMismatch if its tensors disagree."""
    common, scalar_only = None, True
    for t in tensors:
        d = device_of(t)
        cpu_scalar = d.type == "cpu" and t.dim() == 0
        if common is None:
            common, scalar_only = d, cpu_scalar
            continue
        if d == common:
            scalar_only = scalar_only and cpu_scalar
            continue
        if cpu_scalar:
            continue
        if scalar_only:
            common, scalar_only = d, False
            continue
        raise DeviceMismatch(
            f"Expected all tensors to be on the same device, but found at least two devices, {common} and {d}! "
            f"(in {func})"
        )
    return common if common is not None else torch.device("cpu")


def _unwrap(x):
    return x.elem if isinstance(x, OnDevice) else x


def _run(func, args, kwargs):
    kwargs = dict(kwargs)
    if func in _ANY_DEVICE_OPS:
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            _unwrap(dst).copy_(_unwrap(src), *args[2:], **kwargs)
            return dst
        if func is aten._to_copy.default:
            src = args[0]
            target = kwargs.pop("device", None)
            target = device_of(src) if target is None else _norm(target)
            out = func(_unwrap(src), *args[1:], **kwargs)
            return OnDevice(out, target) if _fake(target) else out
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return out
    # a factory (or *_like, .new_*) told to make its tensor on a fake device
    target = kwargs.get("device")
    if _fake(target):
        kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        return tree_map(lambda x: OnDevice(x, target) if isinstance(x, torch.Tensor) else x, out)
    flat, _ = tree_flatten((args, kwargs))
    if func in _INDEX_OPS:
        indices = [i for i in (args[1] if len(args) > 1 else []) if isinstance(i, torch.Tensor)]
        others = [t for t in flat if isinstance(t, torch.Tensor) and not any(t is i for i in indices)]
        here = _common(func, others)
        for i in indices:
            if device_of(i) not in (here, torch.device("cpu")):
                raise DeviceMismatch(f"indices should be either on cpu or on the same device as the indexed tensor "
                                     f"({here}), got {device_of(i)} (in {func})")
    else:
        here = _common(func, [t for t in flat if isinstance(t, torch.Tensor)])
    if target is not None and not _fake(target):
        here = _norm(target)  # an explicit device="cpu"
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if not _fake(here):
        return out
    first = args[0] if args else None

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if isinstance(first, OnDevice) and x is first.elem:  # in-place: the same tensor back
            if (first.shape, first.stride(), first.storage_offset()) != (x.shape, x.stride(), x.storage_offset()):
                with torch._C._DisableTorchDispatch():  # squeeze_, t_, resize_, ...: the wrapper's shape follows
                    first.as_strided_(x.shape, x.stride(), x.storage_offset())
            return first
        return OnDevice(x, here)

    return tree_map(wrap, out)


class FakeDevices(TorchDispatchMode):
    """Inside this mode, ``device="cuda"`` (``cuda:0``, ``cuda:1``, ...) makes :class:`OnDevice` tensors and every
    operation is device-checked as eager PyTorch checks it (see the module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})

    def __enter__(self):
        install()
        # torch.tensor(data, device=...) otherwise allocates on the device directly, below this mode; so (as
        # FakeTensorMode does) it is built on the CPU and then moved, through this mode
        self._lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            torch._C._set_only_lift_cpu_tensors(self._lift)


def to_device(model: torch.nn.Module, device="cuda") -> torch.nn.Module:
    """Move a model's parameters and buffers to a fake device (call inside :class:`FakeDevices`)."""
    return model.to(device)


def split(model: torch.nn.Module, devices=("cuda:0", "cuda:1")) -> dict[str, str]:
    """Spread a causal LM over two fake devices: the embeddings and the first half of the layers on the first, the
    rest, the final norm and the output layer on the second (an output layer tied to the input embeddings stays with
    them); accelerate's hooks move each module's inputs to its
    device, as ``device_map="auto"`` does. Returns the device map (call inside :class:`FakeDevices`)."""
    from accelerate import dispatch_model

    base = model.base_model
    prefix = next(name for name, m in model.named_modules() if m is base)
    layers_name, layers = next((n, m) for n, m in base.named_children() if isinstance(m, torch.nn.ModuleList))
    half = (len(layers) + 1) // 2
    device_map: dict[str, str] = {}
    for name, _ in base.named_children():
        if name != layers_name:
            device_map[f"{prefix}.{name}"] = devices[0] if "emb" in name or name in ("wte", "wpe") else devices[1]
    for i in range(len(layers)):
        device_map[f"{prefix}.{layers_name}.{i}"] = devices[0] if i < half else devices[1]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for name, _ in model.named_children():
        if name != prefix:  # the output layer; with the input embeddings when they share their weight (GPT-2)
            device_map[name] = devices[0] if tied else devices[1]
    # the first device is the main one, as for transformers' device_map="auto" (GPU ids 0, 1, ...: accelerate takes
    # the first of a set of devices, which for names like these would change with the hash seed)
    dispatch_model(model, device_map=device_map, main_device=devices[0])
    return device_map
