"""The sense dictionary: gather teacher states, cluster them per token, compose multi-token senses, store.

One module per stage:

- :mod:`~dskd.senses.corpus`: the corpus (read by :mod:`dskd.corpus`) as tokens and teacher windows;
- :mod:`~dskd.senses.reservoir`: per-token reservoir samples whose rows live in a file;
- :mod:`~dskd.senses.kmeans`: batched k-means over many small groups (pure tensor code);
- :mod:`~dskd.senses.store`: the on-disk store, its reader and the queries on it;
- :mod:`~dskd.senses.build`: gathering (one or several processes), merging, clustering, writing;
- :mod:`~dskd.senses.coverage`: which tokens a store of N positions clusters, counted from the keys alone;
- :mod:`~dskd.senses.cli`: ``dskd senses build``, ``show`` and ``coverage`` as library functions.

See :mod:`dskd.senses.build` for the pipeline and :mod:`dskd.senses.store` for the store layout.
"""

from dskd.devices import resolve_device, resolve_dtype  # the one device rule, re-exported
from dskd.senses.build import (
    DEFAULT_BLOCK_CHARS,
    build_senses,
    gather_batch,
    load_samples,
)
from dskd.senses.cli import (
    STORE_ARTEFACT,
    open_store,
    senses_build_command,
    senses_coverage_command,
    senses_show_command,
)
from dskd.senses.corpus import (
    BUILTIN_CORPORA,
    CorpusError,
    TokenStream,
    corpus_sources,
    iter_blocks,
    token_stream,
    windows,
)
from dskd.senses.kmeans import GRAM_MAX_SAMPLES, cluster_groups, kmeans_padded
from dskd.senses.kmeans import _lloyd_batch as _lloyd_batch  # noqa: F401  (tests reach the private paths)
from dskd.senses.kmeans import _lloyd_one as _lloyd_one  # noqa: F401
from dskd.senses.reservoir import MultiRowSource, Reservoir, RowFile
from dskd.senses.store import (
    FORMAT,
    MAX_SPAN,
    META_FILE,
    SAMPLES_FILE,
    STORE_FILE,
    SenseError,
    SenseStore,
    compose_senses,
    nearest_tokens,
    word_senses,
    write_safetensors,
)

__all__ = [
    "BUILTIN_CORPORA",
    "CorpusError",
    "DEFAULT_BLOCK_CHARS",
    "FORMAT",
    "GRAM_MAX_SAMPLES",
    "MAX_SPAN",
    "META_FILE",
    "SAMPLES_FILE",
    "STORE_ARTEFACT",
    "STORE_FILE",
    "MultiRowSource",
    "Reservoir",
    "RowFile",
    "SenseError",
    "SenseStore",
    "TokenStream",
    "build_senses",
    "cluster_groups",
    "compose_senses",
    "corpus_sources",
    "gather_batch",
    "iter_blocks",
    "kmeans_padded",
    "load_samples",
    "nearest_tokens",
    "open_store",
    "resolve_device",
    "resolve_dtype",
    "senses_build_command",
    "senses_coverage_command",
    "senses_show_command",
    "token_stream",
    "windows",
    "word_senses",
    "write_safetensors",
]
