"""Save and load pruned models without pickled code.

A pruned checkpoint holds tensors (readable with ``torch.load(weights_only=True)``) and a JSON description: the
base model's builder record and torch-pruning's pruning history (root layer name, out/in, removed indices). Loading
rebuilds the unpruned base, replays the history through a fresh DependencyGraph and loads the weights, so nothing
in the file is ever executed. A SHA-256 digest over the description and every tensor catches truncated or edited
files.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from grouping.trace import ForwardFn

from .graph import build_graph
from .io import atomic_write_bytes

if TYPE_CHECKING:
    from .prune import PruneResult

FORMAT = "gcp.pruned/1"


def _digest(meta: str, state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(meta.encode("utf-8"))
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode("utf-8"))
        h.update(str(tensor.dtype).encode())
        h.update(str(list(tensor.shape)).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def save_pruned(result: PruneResult, path: str | Path) -> Path:
    """Write ``result`` to ``path`` atomically (see module docstring for the layout)."""
    model = result.model
    meta = json.dumps(
        {
            "builder": getattr(model, "gcp_builder", None),
            "input_shape": result.input_shape,
            "history": result.history,
            "report": result.report,
            "adapter": result.adapter,
        }
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "meta": meta, "state_dict": state, "digest": _digest(meta, state)}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def read_pruned(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a pruned checkpoint; returns (description, state_dict). Raises ValueError when corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pruned checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong file type, pickled code refused by weights_only
        raise ValueError(
            f"{path} is not a readable gcp pruned checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a gcp pruned checkpoint (format {payload.get('format')!r} != {FORMAT!r})"
            if isinstance(payload, dict)
            else f"{path} is not a gcp pruned checkpoint"
        )
    meta, state = payload.get("meta"), payload.get("state_dict")
    if not isinstance(meta, str) or not isinstance(state, dict):
        raise ValueError(f"{path}: checkpoint is missing its description or weights")
    if _digest(meta, state) != payload.get("digest"):
        raise ValueError(f"{path}: checksum mismatch, the file was modified or damaged after it was written")
    return json.loads(meta), state


def load_pruned(
    path: str | Path,
    base: nn.Module | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Rebuild a pruned model: replay the saved pruning history onto ``base`` and load the weights.

    ``base`` is a freshly built, unpruned model of the same architecture; it may be omitted for models built by
    ``gcp.models`` (their builder and arguments are recorded). A model pruned through an adapter
    (:mod:`gcp.adapters`) gets the same rewrite and tracing here. Returns the model in eval mode with outputs
    bit-identical to the saved one. A file from another architecture raises ValueError naming the mismatch.
    """
    meta, state = read_pruned(path)
    if base is None:
        builder = meta.get("builder")
        if not builder:
            raise ValueError(
                f"{path}: the model was not built by gcp.models; pass base= (a fresh unpruned model)"
            )
        from .models import build

        base = build(builder["name"], **builder["kwargs"])
    if meta.get("adapter"):  # redo the adapter's equivalent rewrite, so layer names match the history
        from .adapters import get_adapter

        family = get_adapter(meta["adapter"])
        if not family.matches(base):
            raise ValueError(
                f"{path}: pruned through adapter {meta['adapter']!r}, which does not fit the base model"
            )
        family.prepare_model(base)
        forward_fn = forward_fn or family.forward_fn
    if example_inputs is None:
        example_inputs = torch.zeros(meta["input_shape"])
    base.eval()
    modules = dict(base.named_modules())
    for name, _is_out, _idxs in meta["history"]:
        if name not in modules:
            raise ValueError(
                f"{path}: layer {name!r} of the saved pruning does not exist in the given base model"
            )
    graph = build_graph(base, example_inputs, forward_fn)
    try:
        graph.load_pruning_history(meta["history"])
    except Exception as exc:
        raise ValueError(f"{path}: the saved pruning does not fit the given base model ({exc})") from exc
    expected = base.state_dict()
    mismatched = [k for k in state if k not in expected or tuple(expected[k].shape) != tuple(state[k].shape)]
    missing = [k for k in expected if k not in state]
    if mismatched or missing:
        raise ValueError(
            f"{path}: weights do not match the rebuilt architecture (mismatched: {mismatched[:5]}, "
            f"missing: {missing[:5]}); was it saved from a different model?"
        )
    base.load_state_dict(state, strict=True)
    return base.eval()
