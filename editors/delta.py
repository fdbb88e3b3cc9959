"""The Delta format: an edit's weight changes in one safetensors file, applied and reverted exactly.

>>> delta = Delta.from_factors(model, {"model.layers.5.mlp.down_proj.weight": (u, v)},
...                            method="rome", base_model="smollm2-135m")      # doctest: +SKIP
>>> delta.save("checkpoints/eiffel_rome.safetensors")                        # doctest: +SKIP
>>> delta = load_delta("checkpoints/eiffel_rome.safetensors")                # doctest: +SKIP
>>> with applied(model, delta):                                              # doctest: +SKIP
...     model.generate(...)
>>> # here the weights are back to the base, bit for bit

Format (version 2):
- one tensor or two per edited parameter, named as in ``model.named_parameters()``:
  ``<name>::u`` [out, r] and ``<name>::v`` [r, in] (the change is ``u @ v``), or
  ``<name>::dense`` (the change itself); every value finite;
- the safetensors metadata key ``lesion_delta`` holds JSON: ``format_version``,
  ``method``, ``hyperparameters``, ``spec``, ``base_model``, ``fingerprints``
  (per parameter: shape, dtype, sha256 of the base value), ``metrics``,
  ``created``, ``lesion_version``, ``content_sha256`` (the tensors' hash, which is
  also the delta's `id`) and ``integrity_sha256``: the hash of the tensors' hash and
  of all the other metadata, written at save. A changed byte anywhere in the file,
  a header edited to name another base model included, fails the load.

Version 1 files (whose hash covered the tensors only) are refused: their metadata
cannot be checked.

Deltas are relative to the base model. The first apply keeps a copy of each
touched parameter's base value; every apply or revert then sets the parameter to
base + the changes of the deltas still applied, in the order they were applied.
So reverting all of them restores the base bit for bit, and reverting one out of
order leaves exactly what applying the others alone would give.
"""

from __future__ import annotations

import json
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interventions.core.atomic import atomic_save_file
from interventions.core.errors import LesionError, short
from interventions.core.tagged import content_hash, fingerprint, integrity_hash, read_tagged

FORMAT_VERSION = 2
META_KEY = "lesion_delta"


class DeltaError(LesionError, ValueError):
    """A delta file or a delta/model pair that cannot be used; the model is left untouched."""


@dataclass(frozen=True, eq=False)
class Delta:
    """Changes to named parameters: rank-r factors ``(u [out, r], v [r, in])`` or dense differences."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted({*self.factors, *self.dense})

    @property
    def id(self) -> str:
        return self.meta["content_sha256"]

    def difference(self, name: str) -> torch.Tensor:
        """The dense change of parameter `name` (float32)."""
        if name in self.factors:
            u, v = self.factors[name]
            return u.float() @ v.float()
        return self.dense[name].float()

    @classmethod
    def from_factors(cls, model: torch.nn.Module, factors: dict | None = None, dense: dict | None = None, *,
                     method: str, base_model: str, hyperparameters: dict | None = None, spec: dict | None = None,
                     metrics: dict | None = None) -> "Delta":
        """A delta against `model`'s current (base) parameters, fingerprinting each touched one."""
        from interventions.core import __version__

        factors = {k: (u.detach().cpu().contiguous(), v.detach().cpu().contiguous())
                   for k, (u, v) in (factors or {}).items()}
        dense = {k: d.detach().cpu().contiguous() for k, d in (dense or {}).items()}
        params = dict(model.named_parameters())
        prints = {}
        for name in sorted({*factors, *dense}):
            if name not in params:
                raise DeltaError(f"`{name}`: no such parameter in the model")
            prints[name] = fingerprint(_base_value(model, name, params[name]))
        meta = {"format_version": FORMAT_VERSION, "method": method, "hyperparameters": hyperparameters or {},
                "spec": spec, "base_model": base_model, "fingerprints": prints, "metrics": metrics or {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "lesion_version": __version__}
        delta = cls(factors, dense, meta)
        _check_shapes(delta)
        _check_finite(delta.tensors(), "the computed change")
        _check_products(delta, "the computed change")
        meta["content_sha256"] = content_hash(delta.tensors())
        return delta

    def with_metrics(self, metrics: dict) -> "Delta":
        return Delta(self.factors, self.dense, {**self.meta, "metrics": {**self.meta.get("metrics", {}), **metrics}})

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (u, v) in self.factors.items():
            out[f"{name}::u"], out[f"{name}::v"] = u, v
        for name, d in self.dense.items():
            out[f"{name}::dense"] = d
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file in the same folder, then a rename), sealed with the
        integrity hash of the metadata as it is now. A non-finite change is refused."""
        tensors = self.tensors()
        _check_finite(tensors, "the delta")
        if content_hash(tensors) != self.meta.get("content_sha256"):
            raise DeltaError("`delta`: its tensors changed after it was made (content hash mismatch); not saved")
        meta = {**self.meta, "integrity_sha256": integrity_hash(self.meta)}
        return atomic_save_file(tensors, path, {META_KEY: json.dumps(meta, sort_keys=True)})


def stack(model: torch.nn.Module, deltas: list[Delta], *, compact: bool = False, **meta) -> Delta:
    """One Delta whose change is the sum of `deltas`' (all made against `model`'s base): factors are
    concatenated along the rank (``[u₁ u₂ …] @ [v₁; v₂; …] = Σ uᵢ vᵢ``), dense changes added. `compact`:
    a parameter whose changes together reach full rank (rank ≥ min(out, in), where factors take more room
    than the matrix) is kept dense instead, so that thousands of sequential edits stay the size of the
    matrices they change. `meta`: `Delta.from_factors`'s keywords (method, base_model, …)."""
    names = sorted({n for d in deltas for n in d.factors})
    factors = {n: (torch.cat([d.factors[n][0] for d in deltas if n in d.factors], 1),
                   torch.cat([d.factors[n][1] for d in deltas if n in d.factors], 0)) for n in names}
    dense = {}
    for d in deltas:
        for n, change in d.dense.items():
            dense[n] = dense[n] + change if n in dense else change
    for n, (u, v) in list(factors.items()):
        if compact and (n in dense or u.shape[1] >= min(u.shape[0], v.shape[1])):
            del factors[n]
            dense[n] = dense[n] + u.float() @ v.float() if n in dense else u.float() @ v.float()
    return Delta.from_factors(model, factors, dense, **meta)


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DeltaError(f"`{name}`: {what} holds nan or inf (a diverged edit?); refused, the weights "
                             "are left as they are")


def _check_products(delta: Delta, what: str) -> None:
    """Finite factors can still multiply to inf (u and v of 1e20 each): each factored change is checked
    as it would reach the weight. A float64 bound, rank x max|u| x max|v|, clears almost every delta
    without forming the product; only a delta near float32's range is multiplied out."""
    limit = torch.finfo(torch.float32).max / 2
    for name, (u, v) in delta.factors.items():
        if not u.numel() or not v.numel():
            continue
        bound = u.shape[1] * u.double().abs().max() * v.double().abs().max()
        if bound < limit:
            continue
        for rows in range(0, u.shape[0], 1024):
            if not bool(torch.isfinite(u[rows:rows + 1024].float() @ v.float()).all()):
                raise DeltaError(f"`{name}`: {what}: its factors multiply to inf (u @ v overflows float32); "
                                 "refused, the weights are left as they are")


def _check_shapes(delta: Delta) -> None:
    for name, info in delta.meta["fingerprints"].items():
        shape = tuple(info["shape"])
        if name in delta.factors:
            u, v = delta.factors[name]
            if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0] or (u.shape[0], v.shape[1]) != shape:
                raise DeltaError(f"`{name}`: factors {tuple(u.shape)} @ {tuple(v.shape)} do not give the "
                                 f"parameter's shape {shape}")
        elif name in delta.dense and tuple(delta.dense[name].shape) != shape:
            raise DeltaError(f"`{name}`: dense change {tuple(delta.dense[name].shape)} does not match {shape}")
        elif name not in delta.factors and name not in delta.dense:
            raise DeltaError(f"`{name}`: fingerprinted but has no tensors")
    extra = set(delta.names) - set(delta.meta["fingerprints"])
    if extra:
        raise DeltaError(f"tensors for {sorted(extra)} have no fingerprint")


def load_delta(path: str | Path) -> Delta:
    """Read and check a delta file; a corrupt, truncated, edited or foreign file raises `DeltaError`."""
    shown = short(str(path))
    meta, tensors = read_tagged(path, META_KEY, DeltaError, "delta", ".safetensors delta file (from `kind: edit`)")
    _check_meta(meta, shown)
    if integrity_hash(meta) != meta["integrity_sha256"]:
        raise DeltaError(f"`delta`: {shown}: its metadata does not match its integrity hash (edited or corrupt)")
    if content_hash(tensors) != meta["content_sha256"]:
        raise DeltaError(f"`delta`: {shown}: its tensors do not match the recorded content hash (corrupt file?)")
    _check_finite(tensors, f"{shown}")
    factors, dense = {}, {}
    for key in tensors:
        name, _, part = key.rpartition("::")
        if part == "dense":
            dense[name] = tensors[key]
        elif part == "u":
            factors[name] = (tensors[key], tensors.get(f"{name}::v"))
        elif part != "v":
            raise DeltaError(f"`delta`: {shown}: unexpected tensor {short(key)}")
    if any(v is None for _, v in factors.values()):
        raise DeltaError(f"`delta`: {shown}: a `::u` factor has no `::v`")
    delta = Delta(factors, dense, meta)
    _check_shapes(delta)
    _check_products(delta, shown)
    return delta


def _check_meta(meta: dict, shown: str) -> None:
    """The header fields apply and verify rely on, checked for type."""
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DeltaError(f"`delta`: {shown} has format_version {short(version)}; this Lesion reads {FORMAT_VERSION}"
                         + (" (version 1 hashes only the tensors, so its metadata cannot be checked; recompute "
                            "the edit)" if version == 1 else ""))
    for key in ("content_sha256", "integrity_sha256"):
        if not isinstance(meta.get(key), str):
            raise DeltaError(f"`delta`: {shown}: metadata `{key}` is missing or not a string")
    prints = meta.get("fingerprints")
    if not isinstance(prints, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("shape"), list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v["shape"])
            and isinstance(v.get("dtype"), str) and isinstance(v.get("sha256"), str) for v in prints.values()):
        raise DeltaError(f"`delta`: {shown}: metadata `fingerprints` must map each parameter to its shape "
                         "(a list of sizes), dtype and sha256")


@dataclass
class _Applied:
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    stack: list[Delta] = field(default_factory=list)


_STATE: "weakref.WeakKeyDictionary[torch.nn.Module, _Applied]" = weakref.WeakKeyDictionary()


def _base_value(model, name: str, param: torch.Tensor) -> torch.Tensor:
    state = _STATE.get(model)
    return state.base[name] if state is not None and name in state.base else param


def applied_deltas(model: torch.nn.Module) -> list[Delta]:
    """The deltas currently applied to `model`, in order."""
    state = _STATE.get(model)
    return list(state.stack) if state else []


@torch.no_grad()
def relative_norms(model: torch.nn.Module, delta: Delta) -> dict[str, float]:
    """``{name: ‖ΔW‖_F / ‖W₀‖_F}`` for each parameter `delta` changes, W₀ the base value (before any
    applied delta), whether or not `delta` is applied now. The growth of this ratio over sequential
    edits is the usual sign of an edited matrix drifting away from the model it came from."""
    params = dict(model.named_parameters())
    return {name: float(delta.difference(name).norm() / _base_value(model, name, params[name]).float().norm())
            for name in delta.names}


def verify(model: torch.nn.Module, delta: Delta) -> None:
    """Raise `DeltaError` unless every touched parameter's base value matches the delta's fingerprint."""
    params = dict(model.named_parameters())
    for name, want in delta.meta["fingerprints"].items():
        if name not in params:
            raise DeltaError(f"`{name}`: the delta edits a parameter this model does not have "
                             f"(delta made for base model {delta.meta.get('base_model')!r})")
        have = fingerprint(_base_value(model, name, params[name]))
        for key in ("shape", "dtype", "sha256"):
            if have[key] != want[key]:
                raise DeltaError(f"`{name}`: {key} is {have[key]} in this model but {want[key]} in the delta; "
                                 f"it was made for base model {delta.meta.get('base_model')!r}")


def _value(base: torch.Tensor, stack: list[Delta], name: str) -> torch.Tensor:
    """Parameter `name`'s value with every delta of `stack` that touches it added to its base value."""
    touching = [d for d in stack if name in d.names]
    if not touching:
        return base
    total = base.float()
    for d in touching:
        total = total + d.difference(name).to(total.device)
    return total.to(base.dtype)


@torch.no_grad()
def _rewrite(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in values.items():
        params[name].copy_(value)


def apply(model: torch.nn.Module, *deltas: Delta) -> None:
    """Apply deltas after checking all of them; on any error nothing is changed."""
    state = _STATE.get(model) or _Applied()
    ids = [d.id for d in deltas]
    if len(set(ids)) != len(ids):
        twice = next(d for d in deltas if ids.count(d.id) > 1)
        raise DeltaError(f"delta {twice.id[:12]} ({twice.meta.get('method')}) is given twice; each delta is "
                         "applied once")
    for delta in deltas:
        if any(d.id == delta.id for d in state.stack):
            raise DeltaError(f"delta {delta.id[:12]} ({delta.meta.get('method')}) is already applied")
        verify(model, delta)
    params = dict(model.named_parameters())
    stack = [*state.stack, *deltas]
    values = {}
    for name in sorted({n for d in deltas for n in d.names}):
        base = state.base.get(name, params[name].detach())
        values[name] = _value(base, stack, name)
        if values[name].is_floating_point() and not bool(torch.isfinite(values[name]).all()):
            raise DeltaError(f"`{name}`: the weight would hold inf or nan with this delta added (in "
                             f"{values[name].dtype}); refused, the weights are left as they are")
    for name in values:
        state.base.setdefault(name, params[name].detach().clone())
    state.stack.extend(deltas)
    _STATE[model] = state
    _rewrite(model, values)


def revert(model: torch.nn.Module, *deltas: Delta) -> None:
    """Revert some applied deltas (all of them when none is named), in any order."""
    state = _STATE.get(model)
    if state is None:
        if deltas:
            raise DeltaError("no delta is applied to this model")
        return
    targets = list(deltas) or list(state.stack)
    ids = {d.id for d in state.stack}
    for delta in targets:
        if delta.id not in ids:
            raise DeltaError(f"delta {delta.id[:12]} ({delta.meta.get('method')}) is not applied to this model")
    gone = {d.id for d in targets}
    names = {n for d in targets for n in d.names}
    state.stack = [d for d in state.stack if d.id not in gone]
    _rewrite(model, {name: _value(state.base[name], state.stack, name) for name in names})
    for name in names:
        if not any(name in d.names for d in state.stack):
            del state.base[name]
    if not state.stack:
        del _STATE[model]


@contextmanager
def unapplied(model: torch.nn.Module, delta: Delta):
    """Within the block, `model` without `delta` (which must be applied now); applied again afterwards,
    also on error. Both steps are bit-exact (`revert`, `apply`)."""
    revert(model, delta)
    try:
        yield model
    finally:
        apply(model, delta)


@contextmanager
def applied(model: torch.nn.Module, *deltas: Delta):
    """Apply for the block, revert afterwards (also on error)."""
    apply(model, *deltas)
    try:
        yield model
    finally:
        revert(model, *deltas)
