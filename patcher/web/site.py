"""Build the `patcher web` site: a static folder (index.html, app.js, worker.js, style.css, site.json), the
model files of one export (and optionally the original's, for side-by-side answers), and a local copy of
the pinned transformers.js + onnxruntime-web runtime (patcher/web/runtime.py), so the page works with no
network at all.

Nothing here runs in the browser: the page reads site.json (which models, which variants, what the
edit did) and does everything else itself.
"""

import json
import os
import re
import shutil
from pathlib import Path

from patcher import __version__
from patcher.errors import PatcherError
from patcher.io import manifest
from patcher.io.paths import read_json_object
from patcher.io.writer import OutputFolder
from patcher.onnx.export import DEVICE_DEFAULTS, TJS_DTYPE
from patcher.web.runtime import TRANSFORMERS_MODULE, WASM_FILES
from patcher.web.runtime import find as find_runtime

ASSETS = Path(__file__).parent / "assets"
SITE_FILES = ("index.html", "app.js", "worker.js", "style.css", "favicon.svg")
# transformers.js dtype -> file suffix (its DEFAULT_DTYPE_SUFFIX_MAPPING)
VARIANTS = {
    "fp32": "",
    "fp16": "_fp16",
    "q4": "_q4",
    "q4f16": "_q4f16",
    "q8": "_quantized",
    "int8": "_int8",
    "uint8": "_uint8",
    "bnb4": "_bnb4",
}
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
DATA_CHUNK = re.compile(r"^(?P<base>.+\.onnx)_data(?:_(?P<n>\d+))?$")


def _chunk_number(name: str) -> int:
    """Which external-data chunk a file is (0: the first, unnumbered one)."""
    m = DATA_CHUNK.match(name)
    return int(m["n"] or 0) if m else 0


def model_files(export: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The export's variants {dtype: [onnx file, external data files...]} and its side files."""
    onnx_dir = export / "onnx"
    if not onnx_dir.is_dir():
        raise PatcherError(
            export, "not an ONNX export (no onnx/ folder); run `patcher export MODEL -o FOLDER` first"
        )
    names = {p.name for p in onnx_dir.iterdir() if p.is_file()}
    variants = {}
    for dtype, suffix in VARIANTS.items():
        main = f"model{suffix}.onnx"
        if main in names:
            data = sorted(
                (n for n in names if (m := DATA_CHUNK.match(n)) and m["base"] == main),
                key=_chunk_number,
            )
            variants[dtype] = [main, *data]
    if not variants:
        raise PatcherError(
            onnx_dir, "no model*.onnx that transformers.js can load (model.onnx, model_q4.onnx, ...)"
        )
    for files in variants.values():
        _check_weights(onnx_dir, files[0])
    side = [n for n in MODEL_SIDE_FILES if (export / n).is_file()]
    for need in ("config.json", "tokenizer.json"):
        if need not in side:
            raise PatcherError(export, f"no {need}: transformers.js needs it to load the model")
    return variants, side


def _check_weights(onnx_dir: Path, main: str) -> None:
    """Every weight the graph keeps in external data is there in full: a missing or truncated data file
    would only fail in the visitor's browser, after the whole site was copied."""
    import onnx

    try:
        graph = onnx.load(str(onnx_dir / main), load_external_data=False).graph
    except Exception as e:
        raise PatcherError(
            onnx_dir / main, f"not a readable ONNX file ({type(e).__name__}): re-export it"
        ) from None
    sizes: dict[str, int] = {}
    for t in graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        where = onnx_dir / info.get("location", "")
        if where.parent != onnx_dir or not where.is_file():
            raise PatcherError(
                onnx_dir / main,
                f"weight {t.name} lives in {info.get('location')!r}, which is "
                f"missing from {onnx_dir}: re-export it",
            )
        size = sizes.setdefault(where.name, where.stat().st_size)
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > size:
            raise PatcherError(
                where, f"truncated: weight {t.name} ends at byte {end}, the file has {size}; re-export it"
            )


def _web_config(export: Path, variants: dict) -> dict:
    """config.json for the site: the export's own transformers.js_config wins; what it leaves out is
    filled in from the files present (external data per file, so older exports load too)."""
    cfg = read_json_object(export / "config.json")
    tjs = dict(cfg.get("transformers.js_config") or {})
    if "use_external_data_format" not in tjs:
        chunks = {files[0]: len(files) - 1 for files in variants.values() if len(files) > 1}
        if chunks:
            tjs["use_external_data_format"] = chunks
    if "dtype" not in tjs:
        tjs["dtype"] = "q4" if "q4" in variants else ("fp32" if "fp32" in variants else next(iter(variants)))
    wasm = (tjs.get("device_config") or {}).get("wasm") or {}
    if "dtype" not in wasm:  # an export that predates the measured per-device choice: WASM_ORDER
        fast = [
            d for d in WASM_ORDER if d in variants and not (d == "q8" and _has_nbits(export, variants[d][0]))
        ]
        if fast:
            tjs["device_config"] = {**(tjs.get("device_config") or {}), "wasm": {**wasm, "dtype": fast[0]}}
    cfg["transformers.js_config"] = tjs
    return cfg


# an export that predates the per-device choice gets patcher export's own WASM order (quality first, then
# speed; measured in BENCHMARKS.md), in transformers.js's names
WASM_ORDER = tuple(TJS_DTYPE[d] for d in DEVICE_DEFAULTS["wasm"])


def _has_nbits(export: Path, file: str) -> bool:
    """True for an int8 file made of 8-bit MatMulNBits (older exports): the slowest layout on WASM."""
    import onnx

    graph = onnx.load(str(export / "onnx" / file), load_external_data=False).graph
    return any(n.op_type == "MatMulNBits" for n in graph.node)


def provenance(export: Path) -> dict:
    """What the exported model is: the edit recorded in the shards (ablate / inject parameters) and the
    export's own record, for the page's provenance panel."""
    record = export / "patcher-export.json"
    info = read_json_object(record) if record.is_file() else {}
    man = manifest.read(export) or {}
    return {
        "source": info.get("source") or (man.get("edit") or {}).get("source"),
        "model_type": info.get("model_type"),
        "layers": info.get("layers"),
        "export_command": man.get("command"),
        "edit": info.get("provenance"),
        "patcher": info.get("patcher") or man.get("patcher"),
    }


def _copy(src: Path, dst: Path) -> None:
    """A plain copy (never a link: the site is moved and served as a unit), world-readable."""
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)


def _add_model(tmp: Path, name: str, export: Path, label: str | None = None) -> dict:
    """Copy one export under models/NAME; its column is titled `label`, else by what the weights record
    ("edited" only when an edit is recorded)."""
    variants, side = model_files(export)
    prov = provenance(export)
    dst = tmp / "models" / name
    (dst / "onnx").mkdir(parents=True)
    for files in variants.values():
        for f in files:
            _copy(export / "onnx" / f, dst / "onnx" / f)
    for f in side:
        if f != "config.json":
            _copy(export / f, dst / f)
    cfg = _web_config(export, variants)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    size = sum((export / "onnx" / f).stat().st_size for files in variants.values() for f in files)
    return {
        "id": name,
        "label": label or ("edited" if prov["edit"] else "unedited"),
        "path": f"models/{name}",
        "variants": list(variants),
        "default_dtype": cfg["transformers.js_config"].get("dtype"),
        "device_dtype": {
            dev: c.get("dtype")
            for dev, c in (cfg["transformers.js_config"].get("device_config") or {}).items()
            if c.get("dtype")
        },
        "bytes": size,
        "provenance": prov,
    }


def build(
    export: Path,
    out: Path,
    compare: Path | None = None,
    js: Path | None = None,
    cdn: bool = False,
    force: bool = False,
    command: str | None = None,
    max_new_tokens: int = 64,
    say=None,
) -> Path:
    """Write the site for `export` (and `compare`) into `out`; `say` hears about a first-run download."""
    export, out = Path(export), Path(out)
    inputs = [export] + ([Path(compare)] if compare else [])
    for src in inputs:
        model_files(src)  # fail before touching anything
    runtime = find_runtime(js, cdn, say)
    if force and out.exists() and any(out.iterdir()) and manifest.read(out) is None:
        raise PatcherError(
            out,
            "exists and is not a patcher output (no patcher-manifest.json); "
            "--force only replaces an earlier patcher output",
        )
    with OutputFolder(out, inputs, force=force) as tmp:
        models = [_add_model(tmp, "edited", export)]
        if compare:
            models.insert(0, _add_model(tmp, "original", Path(compare), "original"))
        if runtime.dist is not None and runtime.wasm_dir is not None:  # both, or both None (CDN)
            (tmp / "js").mkdir()
            _copy(runtime.dist / TRANSFORMERS_MODULE, tmp / "js" / TRANSFORMERS_MODULE)
            for f in WASM_FILES:
                _copy(runtime.wasm_dir / f, tmp / "js" / f)
        for f in SITE_FILES:
            _copy(ASSETS / f, tmp / f)
        site = {
            "patcher": __version__,
            "models": models,
            "max_new_tokens": max_new_tokens,
            "runtime": {
                "transformers": runtime.transformers_version,
                "onnxruntime_web": runtime.ort_version,
                "module": runtime.module_url(),
                "wasm_base": runtime.wasm_base(),
                "wasm_files": list(WASM_FILES[:2]),
                "local": runtime.dist is not None,
            },
        }
        (tmp / "site.json").write_text(json.dumps(site, indent=2) + "\n", encoding="utf-8")
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        outputs = {
            str(p.relative_to(tmp)): manifest.sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest.write(
            tmp,
            kind="web",
            command=command,
            inputs={str(p): manifest.folder_identity(p) for p in inputs},
            outputs=outputs,
            record={
                "export": str(export),
                "compare": str(compare) if compare else None,
                "transformers.js": runtime.transformers_version,
                "onnxruntime-web": runtime.ort_version,
                "cdn": cdn,
            },
        )
        os.chmod(tmp / manifest.MANIFEST, 0o644)
    return out
