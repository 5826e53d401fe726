"""Export a finished run: a peft adapter folder, or a merged model folder transformers loads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import BudgetuneError
from .rundir import RunDir


def export(run_dir: str | Path, merge: bool = False, out: str | Path | None = None, overwrite: bool = False,
           trust_remote_code: bool = False) -> Path:
    """Write RUN_DIR/export/{adapter,merged,model} (or `out`); return the folder.

    merge=False: adapter methods give a peft adapter folder (PeftModel.from_pretrained);
    full fine-tuning gives the model folder. merge=True: always a plain transformers model
    (AutoModelForCausalLM.from_pretrained), with the adapter folded into the weights.
    """
    from .config import load_config
    from .evaluate import load_trained
    from .methods import get_method

    run = RunDir(Path(run_dir))
    run.require_model()
    cfg = load_config(run.config)
    method = get_method(cfg.method.name)
    kind = "merged" if merge else method.output
    target = Path(out) if out else run.path / "export" / kind
    if target.exists() and not target.is_dir():
        raise BudgetuneError(f"export target {target} is a file; choose another --out")
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise BudgetuneError(f"export target {target} already exists; pass --overwrite or choose --out")
        if not _is_export(target):  # --overwrite replaces an earlier export, never an unrelated folder
            raise BudgetuneError(f"--overwrite: export target {target} is not a model or adapter folder; "
                                 "refusing to delete it (choose another --out)")
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if merge and method.output == "adapter":
        # a quantised base (model.quantize) is dequantised first: the adapter is folded into float weights
        model, tokenizer, _ = load_trained(run.path, trust_remote_code=trust_remote_code, dequantize=True)
        model = method.merged(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    else:
        shutil.copytree(run.model, tmp)
        if method.output == "adapter" and run.base.exists():
            _point_adapter_at(tmp, run.base.resolve())
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _is_export(folder: Path) -> bool:
    """A folder an export wrote: a transformers model or a peft adapter at its top level."""
    return (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()


def _point_adapter_at(folder: Path, base: Path) -> None:
    """A copied adapter must name its base by an absolute path to load from anywhere."""
    import json

    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config, indent=2))
