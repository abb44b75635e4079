"""The core: what every experiment is built from.

* :mod:`~helpers.core.attention` - the one attention function (registered with transformers' ``AttentionInterface``)
  and the hooks that read or change attention (isolate, re-weight, record);
* :mod:`~helpers.core.models` - loading hub or offline models, their identity;
* :mod:`~helpers.core.tasks` and :mod:`~helpers.core.prompts` - the four datasets and the prompts built from them,
  with every position of interest recorded at construction;
* :mod:`~helpers.core.prefix` - running a shared demonstration prefix once and many queries over its cache;
* :mod:`~helpers.core.saliency` - the saliency flows of §2.1;
* :mod:`~helpers.core.runs` - the results cache; :mod:`~helpers.core.stats` - estimates with intervals;
* :mod:`~helpers.core.findings` - what a verdict row is (a finding, its measurement and its rule).

Nothing here imports from the layers above (experiments, pages, cli).
"""
