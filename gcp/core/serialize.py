"""Write and read gcp's model files without pickled code: the one place where a model file is loaded.

Two formats, both plain tensors and strings (readable with ``torch.load(weights_only=True)``):

* a **pruned checkpoint** (``format: gcp.pruned/1``): the weights and a JSON description, i.e. the base model's
  builder record, the example input's shape and torch-pruning's pruning history (root layer name, out/in,
  removed indices). Loading rebuilds the unpruned base, replays the history through a fresh DependencyGraph
  and loads the weights.
* a **dense model** (the shipped teacher, ``trained.pt``, ``sparse.pt``): ``{"builder": JSON of
  model.gcp_builder, "state_dict", "map50"}``.

:func:`load_model` reads either; :func:`load_pruned` the first, also onto a base model the caller builds. Every
problem with a file raises :class:`ModelFileError`, one line that names the file and what is wrong with it
(truncated or not a PyTorch file, not a gcp model file, made for another architecture, damaged), which the
command line prints as it is.

A pruned checkpoint carries a SHA-256 digest of its description and tensors. It is a **corruption check**: it
detects a file damaged after it was written (a truncated copy, flipped bits). It is not a signature: the digest
lives in the file it checks, so whoever edits a file can recompute it, and a file that passes says nothing
about who wrote it. What keeps an edited or crafted file harmless is that nothing in it is executed (no
pickled code, only tensors and JSON) and that what it can make the loader allocate (the example input, the
size of the base network) is bounded by :mod:`gcp.limits` and checked before anything is built.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gcp.core.graph import build_graph
from gcp.core.registry import builders, get_adapter
from gcp.io import ModelFileError, atomic_torch_save, atomic_write_bytes, one_line, read_torch_dict
from gcp.limits import (
    MAX_ANCHOR_VALUES,
    MAX_BASE_PARAMETERS,
    MAX_INPUT_DIMS,
    MAX_INPUT_ELEMENTS,
    MAX_NUM_CLASSES,
    MULTIPLIER,
)
from grouping.trace import ForwardFn

if TYPE_CHECKING:
    from gcp.core.prune import PruneResult

FORMAT = "gcp.pruned/1"
DENSE_KEYS = frozenset({"builder", "state_dict"})


def _digest(meta: str, state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the description and every tensor (name, dtype, shape, bytes): the corruption check."""
    h = hashlib.sha256(meta.encode("utf-8"))
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(key.encode("utf-8"))
        h.update(str(tensor.dtype).encode())
        h.update(str(list(tensor.shape)).encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- writing


def save_pruned(result: PruneResult, path: str | Path) -> Path:
    """Write ``result`` to ``path`` atomically as a pruned checkpoint (see the module docstring)."""
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


def save_model(model: nn.Module, path: str | Path, map50: float | None = None) -> Path:
    """Write an unpruned :mod:`gcp.detection.models` detector as a dense model file (builder record, fp32 weights,
    mAP@0.5), the format of the shipped teacher; :func:`load_model` reads it back."""
    builder = getattr(model, "gcp_builder", None)
    if builder is None:
        raise ValueError("save_model stores gcp.detection.models detectors (they carry model.gcp_builder)")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return atomic_torch_save({"builder": json.dumps(builder), "state_dict": state, "map50": map50}, path)


# --------------------------------------------------------------------------------------------------- reading


def _pruned_parts(payload: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checked description and weights of a pruned checkpoint's payload."""
    if payload.get("format") != FORMAT:
        raise ModelFileError(
            f"{path}: not a gcp pruned checkpoint (format {payload.get('format')!r}, expected {FORMAT!r})"
        )
    meta_text, state = payload.get("meta"), payload.get("state_dict")
    if not isinstance(meta_text, str) or not isinstance(state, dict):
        raise ModelFileError(f"{path}: damaged pruned checkpoint: its description or weights are missing")
    if _digest(meta_text, state) != payload.get("digest"):
        raise ModelFileError(
            f"{path}: damaged pruned checkpoint: the corruption check failed (the SHA-256 digest stored in "
            "the file does not match its content, so it changed after it was written)"
        )
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError as error:
        raise ModelFileError(
            f"{path}: damaged pruned checkpoint: description is not JSON ({error})"
        ) from None
    if not isinstance(meta, dict) or not {"history", "input_shape"} <= set(meta):
        raise ModelFileError(f"{path}: damaged pruned checkpoint: description lacks history or input_shape")
    _check_history(meta["history"], path)
    return meta, state


def read_pruned(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a pruned checkpoint and run its corruption check; returns (description, state_dict). Raises
    ModelFileError (a ValueError) when the file is unreadable, not a pruned checkpoint or damaged."""
    path = Path(path)
    return _pruned_parts(read_torch_dict(path, "model file"), path)


def load_pruned(
    path: str | Path,
    base: nn.Module | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """Rebuild a pruned model: replay the saved pruning history onto ``base`` and load the weights.

    ``base`` is a freshly built, unpruned model of the same architecture; it may be omitted for models built by
    ``gcp.detection.models`` (their builder and arguments are recorded). ``base`` itself is never modified: the pruning
    is replayed on a copy, which is returned, so a file that does not fit leaves it as it was. A model pruned through an adapter
    (:mod:`gcp.adapters`) gets the same rewrite and tracing here. Returns the model in eval mode with outputs
    bit-identical to the saved one. A file from another architecture, a damaged one, or one whose description
    asks for more than :mod:`gcp.limits` allows raises ModelFileError naming the file and the problem.
    """
    path = Path(path)
    meta, state = read_pruned(path)
    return _rebuild_pruned(meta, state, path, base, forward_fn, example_inputs)


def load_model(path: str | Path) -> nn.Module:
    """Any gcp model file, pruned checkpoint or dense model, as an eval-mode model: what every command that
    takes a model file reads it with, so that each reports a bad file the same way (ModelFileError)."""
    path = Path(path)
    payload = read_torch_dict(path, "model file")
    if payload.get("format") == FORMAT:
        return _rebuild_pruned(*_pruned_parts(payload, path), path)
    if not set(payload) >= DENSE_KEYS:
        kind = f"format {payload['format']!r}" if "format" in payload else f"keys {sorted(map(str, payload))}"
        raise ModelFileError(
            f"{path}: not a gcp model file (neither a pruned checkpoint nor builder + state_dict; it has {kind})"
        )
    try:
        builder = json.loads(payload["builder"])
    except (TypeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{path}: damaged model file: builder record is not JSON ({error})") from None
    if not isinstance(payload["state_dict"], dict):
        raise ModelFileError(f"{path}: damaged model file: state_dict is not a mapping of tensors")
    model = _build_recorded(builder, path)
    _load_weights(model, payload["state_dict"], path, f"the {builder['name']} the file records")
    return model.eval()


# -------------------------------------------------------------------------------------- checks and rebuilding


def _check_history(history: Any, path: Path) -> None:
    """A pruning history is a list of [layer name, out (bool), removed indices (ints)]."""
    ok = isinstance(history, list) and all(
        isinstance(step, list)
        and len(step) == 3
        and isinstance(step[0], str)
        and isinstance(step[1], bool)
        and isinstance(step[2], list)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in step[2])
        for step in history
    )
    if not ok:
        raise ModelFileError(
            f"{path}: damaged pruned checkpoint: the pruning history is not a list of "
            "[layer name, out, removed indices]"
        )


def _check_input_shape(shape: Any, path: Path) -> list[int]:
    """The recorded example-input shape, if it is one the loader may allocate (see gcp.limits)."""
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_INPUT_DIMS
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
    ):
        raise ModelFileError(
            f"{path}: input_shape {shape!r} is not a list of 1 to {MAX_INPUT_DIMS} positive integers"
        )
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ModelFileError(
            f"{path}: input_shape {shape} asks for {math.prod(shape):,} elements, more than the "
            f"{MAX_INPUT_ELEMENTS:,} a model file may ask for; refusing to allocate it (damaged or crafted file?)"
        )
    return shape


def _check_builder_kwargs(name: str, kwargs: dict[str, Any], path: Path) -> None:
    """Each recorded argument the builder takes, inside its bounds; every gcp builder's arguments are
    covered, and any other (a future builder's) is still bounded by the parameter count."""
    accepted = inspect.signature(builders()[name]).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelFileError(f"{path}: the recorded builder {name!r} takes no argument(s) {unknown}")

    def refuse(argument: str, expected: str) -> ModelFileError:
        return ModelFileError(
            f"{path}: the recorded builder argument {name}({argument}={kwargs[argument]!r}) is outside "
            f"{expected}; refusing to build it (damaged or crafted file?)"
        )

    classes = kwargs.get("num_classes", 1)
    if not isinstance(classes, int) or isinstance(classes, bool) or not 1 <= classes <= MAX_NUM_CLASSES:
        raise refuse("num_classes", f"the integers 1 to {MAX_NUM_CLASSES:,}")
    for argument in ("width", "depth"):
        if argument in kwargs and kwargs[argument] not in MULTIPLIER:
            raise refuse(argument, f"{MULTIPLIER}")
    anchors = kwargs.get("anchors")
    if anchors is not None:
        count = _count_numbers(anchors, MAX_ANCHOR_VALUES + 1)
        if count is None or count > MAX_ANCHOR_VALUES:
            raise refuse("anchors", f"nested lists of at most {MAX_ANCHOR_VALUES} numbers")


def _count_numbers(value: Any, stop: int) -> int | None:
    """How many numbers a nested list holds (None if anything else is in it); stops counting at ``stop``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return 1
    if not isinstance(value, list):
        return None
    total = 0
    for item in value:
        count = _count_numbers(item, stop - total)
        if count is None:
            return None
        total += count
        if total >= stop:
            break
    return total


def _build_recorded(builder: Any, path: Path) -> nn.Module:
    """The unpruned base a file's builder record describes, after checking it asks for a bounded network:
    its arguments against gcp.limits, then its parameter count on the meta device (no memory)."""
    known = builders()
    if (
        not isinstance(builder, dict)
        or not isinstance(builder.get("name"), str)
        or not isinstance(builder.get("kwargs"), dict)
    ):
        raise ModelFileError(f"{path}: damaged model file: the builder record is not {{name, kwargs}}")
    name, kwargs = builder["name"], builder["kwargs"]
    if name not in known:
        raise ModelFileError(
            f"{path}: made for architecture {name!r}, which no registered builder makes "
            f"(available: {', '.join(sorted(known))})"
        )
    _check_builder_kwargs(name, kwargs, path)
    try:
        with torch.device("meta"):
            sized = known[name](**kwargs)
    except (TypeError, ValueError) as error:
        raise ModelFileError(
            f"{path}: the recorded builder {name!r} refuses its arguments ({error})"
        ) from None
    parameters = sum(p.numel() for p in sized.parameters())
    if parameters > MAX_BASE_PARAMETERS:
        raise ModelFileError(
            f"{path}: the recorded {name} with {kwargs} would have {parameters:,} parameters, more than the "
            f"{MAX_BASE_PARAMETERS:,} a model file may ask for; refusing to build it (damaged or crafted file?)"
        )
    return known[name](**kwargs)


def _load_weights(model: nn.Module, state: dict[str, Any], path: Path, architecture: str) -> None:
    """Load ``state`` strictly, first telling in one line which tensors do not fit ``architecture`` (what the
    model was rebuilt as, for the message)."""
    expected = model.state_dict()
    mismatched = [
        k
        for k in state
        if k not in expected
        or not isinstance(state[k], torch.Tensor)
        or tuple(expected[k].shape) != tuple(state[k].shape)
    ]
    missing = [k for k in expected if k not in state]
    if mismatched or missing:
        counts = [
            f"{len(names)} {what}, e.g. {names[:3]}"
            for names, what in ((mismatched, "mismatched"), (missing, "missing"))
            if names
        ]
        raise ModelFileError(
            f"{path}: weights do not match {architecture} ({'; '.join(counts)}); "
            "were they saved from another architecture?"
        )
    model.load_state_dict(state, strict=True)


def _rebuild_pruned(
    meta: dict[str, Any],
    state: dict[str, torch.Tensor],
    path: Path,
    base: nn.Module | None = None,
    forward_fn: ForwardFn | None = None,
    example_inputs: Any = None,
) -> nn.Module:
    """The pruned model a checked checkpoint describes (see :func:`load_pruned`)."""
    if example_inputs is None:
        example_inputs = torch.zeros(_check_input_shape(meta["input_shape"], path))
    architecture = "the given base model"
    if base is not None:
        # Replayed on a copy: a file that turns out not to fit (checked only while the history is replayed and
        # the weights loaded) must leave the caller's model as it was, not half pruned.
        base = copy.deepcopy(base)
    else:
        builder = meta.get("builder")
        if not builder:
            raise ModelFileError(
                f"{path}: the model was not built by gcp.detection.models; pass base= (a fresh unpruned model)"
            )
        base = _build_recorded(builder, path)
        architecture = f"the {builder['name']} the file records"
    if meta.get("adapter"):  # redo the adapter's equivalent rewrite, so layer names match the history
        try:
            family = get_adapter(meta["adapter"])
        except ValueError as error:
            raise ModelFileError(f"{path}: {error}") from None
        if not family.matches(base):
            raise ModelFileError(
                f"{path}: pruned through adapter {meta['adapter']!r}, which does not fit the base model"
            )
        family.prepare_model(base)
        forward_fn = forward_fn or family.forward_fn
    base.eval()
    modules = dict(base.named_modules())
    for name, _is_out, _idxs in meta["history"]:
        if name not in modules:
            raise ModelFileError(
                f"{path}: layer {name!r} of the saved pruning does not exist in the base model "
                "(a file of another architecture?)"
            )
    try:
        graph = build_graph(base, example_inputs, forward_fn)
    except Exception as error:  # noqa: BLE001 (the trace runs the model: any error means it cannot run)
        raise ModelFileError(
            f"{path}: the base model does not run on the recorded input ({one_line(error)})"
        ) from None
    try:
        graph.load_pruning_history(meta["history"])
    except Exception as error:  # noqa: BLE001 (torch-pruning raises IndexError, KeyError, ...)
        raise ModelFileError(
            f"{path}: the saved pruning does not fit the base model ({one_line(error)})"
        ) from None
    _load_weights(base, state, path, f"{architecture} after its saved pruning")
    return base.eval()
