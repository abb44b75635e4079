"""Full-page screenshots of every built page with headless Chromium, at desktop (1280 px) and phone (390 px) widths.

    python scripts/screenshots.py [_build/html] [_build/screenshots]

Needs a Chromium binary (``apt-get install chromium``). Each page is shot in a tall window, then the empty rows below
the content column are cropped away; a page whose content reaches the window's bottom is shot again in a window twice
as tall (up to :data:`MAX_HEIGHT`), so a long page is captured whole.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

WIDTHS = {"desktop": 1280, "phone": 390}
HEIGHT = 20000  # the first window height; the PNG is cropped to its content below
MAX_HEIGHT = 80000


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("No Chromium found: install it (apt-get install -y chromium).")


def crop_bottom(png: Path) -> bool:
    """Remove the empty (uniform) rows below the page's content; False when the content reaches the bottom (the
    window was too short)."""
    from PIL import Image
    import numpy as np

    img = Image.open(png).convert("RGB")
    a = np.asarray(img)[: img.height - 200, int(img.width * 0.2): int(img.width * 0.8)]  # content column, no footer
    background = a[-1, a.shape[1] // 2]
    rows = np.nonzero((np.abs(a.astype(int) - background).sum(axis=2) > 30).any(axis=1))[0]
    if len(rows) and rows[-1] >= a.shape[0] - 5:
        return False
    if len(rows):
        img.crop((0, 0, img.width, min(img.height, rows[-1] + 40))).save(png)
    return True


def main(argv: list[str]) -> None:
    html_dir = Path(argv[0] if argv else "_build/html").resolve()
    out_dir = Path(argv[1] if len(argv) > 1 else "_build/screenshots").resolve()
    if not html_dir.is_dir():
        sys.exit(f"{html_dir} does not exist: build the book first (make book)")
    out_dir.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    pages = sorted(p for p in html_dir.rglob("*.html")
                   if not any(part.startswith(("_", ".")) for part in p.relative_to(html_dir).parts)
                   and p.name not in {"genindex.html", "search.html"})
    for page in pages:
        for label, width in WIDTHS.items():
            name = "-".join(page.relative_to(html_dir).with_suffix("").parts)
            png = out_dir / f"{name}-{label}.png"
            height = HEIGHT
            while True:
                cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                       "--force-device-scale-factor=1", f"--window-size={width},{height}",
                       "--virtual-time-budget=8000", f"--screenshot={png}", page.as_uri()]
                subprocess.run(cmd, check=True, capture_output=True, timeout=300)
                if crop_bottom(png) or height >= MAX_HEIGHT:
                    break
                height *= 2
            print(png)


if __name__ == "__main__":
    main(sys.argv[1:])
