"""Reading compressed-tensors checkpoints (what llm-compressor writes and vLLM/SGLang load).

Legend: O out_features, K in_features, G scale groups per row, gs group size, b bits.

config.json's `quantization_config` (quant_method "compressed-tensors") lists `config_groups`,
each with `targets` (class names such as "Linear", module names, or "re:" regexes matched from
the start of the name), `weights` (num_bits, type int|float, symmetric, strategy
group|channel|tensor, group_size) and a `format`; `ignore` lists modules kept in full precision.
A quantized Linear `X` is stored as:

- pack-quantized (int4/int8): `X.weight_packed` int32 [O, ceil(K*b/32)] (element i of a row at
  bits b*i.., offset by 2^(b-1)), `X.weight_scale` [O, G], `X.weight_shape` [2] = (O, K) and,
  if asymmetric, `X.weight_zero_point` packed the same way along O: [ceil(O*b/32), G];
- naive-quantized (int8): `X.weight` int8 [O, K], `X.weight_scale`, `X.weight_zero_point`;
- float-quantized (FP8 e4m3): `X.weight` float8 [O, K], `X.weight_scale` [O, 1] or [1].

w = (q - zero) * scale per group. This module reads the format itself (a few lines, checked
against compressed-tensors' own decompressor in tests) so that loading needs neither that
library nor the transformers import it brings; `qomni quantize` writes with the library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from qomni.quant.kernels import IntWeight

# Tensors of one quantized module, by format; "weight_zero_point" joins for asymmetric schemes.
_PARTS = {"pack-quantized": ("weight_packed", "weight_scale", "weight_shape"),
          "naive-quantized": ("weight", "weight_scale"),
          "float-quantized": ("weight", "weight_scale")}
# Names compressed-tensors gives quantization parameters (used to recognise quantized modules).
QPARAM_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape",
                   "weight_g_idx", "weight_global_scale", "input_scale", "input_zero_point",
                   "input_global_scale", "output_scale", "k_scale", "v_scale")


class QuantConfigError(ValueError):
    """A quantization_config qomni cannot run, or a tensor that does not fit its scheme."""


@dataclass(frozen=True)
class Scheme:
    """One config group's weight quantization."""

    group: str  # the config group's name, for messages
    format: str
    type: str  # "int" | "float"
    num_bits: int
    symmetric: bool
    strategy: str  # "group" | "channel" | "tensor"
    group_size: int | None
    targets: tuple[str, ...]

    def __str__(self) -> str:
        kind = f"{self.type}{self.num_bits}" + ("" if self.symmetric else " asymmetric")
        per = f"group {self.group_size}" if self.strategy == "group" else f"per {self.strategy}"
        return f"{self.format} {kind} {per} (config group {self.group!r})"

    @property
    def parts(self) -> tuple[str, ...]:
        zero = () if self.symmetric else ("weight_zero_point",)
        return _PARTS[self.format] + zero

    def decode(self, parts: dict[str, torch.Tensor], shape: tuple[int, int]
               ) -> IntWeight | tuple[torch.Tensor, torch.Tensor]:
        """The module's tensors -> IntWeight, or (FP8 weight [O, K], scale [O] or [1]).
        `shape` is the module's (O, K); any mismatch is a QuantConfigError."""
        o, k = shape
        scale = parts["weight_scale"]
        if self.format == "float-quantized":
            w = parts["weight"]
            if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != (o, k):
                raise QuantConfigError(f"weight is {w.dtype} {tuple(w.shape)}; {self} expects "
                                       f"float8_e4m3fn {(o, k)}")
            want = (o, 1) if self.strategy == "channel" else (1,)
            if scale.numel() != (o if self.strategy == "channel" else 1):
                raise QuantConfigError(f"weight_scale {tuple(scale.shape)} does not fit {self} "
                                       f"(expected {want})")
            return w, scale.reshape(-1).float()
        if self.format == "pack-quantized":
            packed, stored = parts["weight_packed"], tuple(int(v) for v in parts["weight_shape"])
            if stored != (o, k):
                raise QuantConfigError(f"weight_shape {stored} does not fit the model's {(o, k)}")
            q = unpack_int32(packed, self.num_bits, k, "weight_packed")
        else:
            q = parts["weight"]
            if q.dtype != torch.int8 or tuple(q.shape) != (o, k):
                raise QuantConfigError(f"weight is {q.dtype} {tuple(q.shape)}; {self} expects "
                                       f"int8 {(o, k)}")
        gs = self._group_size(k)
        scale = self._per_row(scale, o, k // gs, "weight_scale").float()
        zero = None
        if not self.symmetric:
            zp = parts["weight_zero_point"]
            if self.format == "pack-quantized":  # packed along O
                zp = unpack_int32(zp.T.contiguous(), self.num_bits, o, "weight_zero_point").T
            zero = self._per_row(zp, o, k // gs, "weight_zero_point").to(torch.int8)
        return IntWeight(q, scale, zero, self.num_bits, gs)

    def _group_size(self, k: int) -> int:
        if self.strategy != "group":
            return k
        if k % self.group_size:
            raise QuantConfigError(f"group size {self.group_size} does not divide in_features "
                                   f"{k} ({self})")
        return self.group_size

    def _per_row(self, t: torch.Tensor, o: int, groups: int, what: str) -> torch.Tensor:
        if self.strategy == "tensor" and t.numel() == 1:
            return t.reshape(1, 1).expand(o, 1).contiguous()
        if tuple(t.shape) != (o, groups):
            raise QuantConfigError(f"{what} {tuple(t.shape)} does not fit {self}: expected "
                                   f"{(o, groups)} for {o} rows")
        return t


def unpack_int32(packed: torch.Tensor, bits: int, cols: int, what: str) -> torch.Tensor:
    """int32 [R, W] with 32/b values per word (value i of a row at bits b*i) -> int8 [R, cols]."""
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise QuantConfigError(f"{what} is {packed.dtype} {tuple(packed.shape)}, expected int32 "
                               "[rows, words]")
    per_word = 32 // bits
    if packed.shape[1] != -(-cols * bits // 32):
        raise QuantConfigError(f"{what} has {packed.shape[1]} words per row, {cols} values of "
                               f"{bits} bits need {-(-cols * bits // 32)}")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # [R, W, 32/b]
    values = values.reshape(packed.shape[0], packed.shape[1] * per_word)[:, :cols]
    return (values - (1 << (bits - 1))).to(torch.int8)


class CompressedConfig:
    """A validated compressed-tensors `quantization_config`: which scheme, if any, a module has."""

    def __init__(self, qc: dict):
        method = qc.get("quant_method")
        if method != "compressed-tensors":
            raise QuantConfigError(f"quantization_config quant_method {method!r} is not supported: "
                                   "qomni reads compressed-tensors checkpoints")
        if qc.get("kv_cache_scheme"):
            raise QuantConfigError("quantization_config kv_cache_scheme (a quantized KV cache) "
                                   "is not supported")
        for key in ("transform_config", "sparsity_config"):
            if qc.get(key):
                raise QuantConfigError(f"quantization_config {key} is not supported "
                                       f"({sorted(qc[key])})")
        groups = qc.get("config_groups") or {}
        if not groups:
            raise QuantConfigError("quantization_config has no config_groups")
        self.schemes = [_scheme(name, g, qc.get("format")) for name, g in groups.items()]
        self.ignore = tuple(qc.get("ignore") or ())

    def scheme_for(self, module: str) -> Scheme | None:
        """The scheme of a Linear-like module by its checkpoint name (None: ignored or not
        targeted). Names also match in transformers-5's in-memory naming."""
        names = (module, hf_memory_name(module))
        if any(_matches(n, t) for n in names for t in self.ignore):
            return None
        for s in self.schemes:
            if any(_matches(n, t) for n in names for t in s.targets):
                return s
        return None


def _scheme(name: str, group: dict, default_format: str | None) -> Scheme:
    w = group.get("weights")
    fmt = group.get("format") or default_format
    where = f"config group {name!r}"
    if not w:
        raise QuantConfigError(f"{where} has no weights scheme")
    for act in ("input_activations", "output_activations"):
        if group.get(act):
            raise QuantConfigError(f"{where}: {act} quantization is not supported (qomni runs "
                                   "weight-only schemes such as W4A16, W8A16, FP8 weights)")
    kind, bits = w.get("type", "int"), w.get("num_bits")
    strategy, gs = w.get("strategy"), w.get("group_size")
    supported = {("int", 4): "pack-quantized", ("int", 8): ("pack-quantized", "naive-quantized"),
                 ("float", 8): "float-quantized"}
    if (kind, bits) not in supported or fmt not in supported[(kind, bits)]:
        raise QuantConfigError(f"{where}: {fmt} {kind}{bits} weights are not supported (qomni "
                               "reads pack-quantized int4/int8, naive-quantized int8 and "
                               "float-quantized FP8)")
    allowed = ("channel", "tensor") if kind == "float" else ("group", "channel", "tensor")
    if strategy not in allowed:
        raise QuantConfigError(f"{where}: strategy {strategy!r} is not supported for {kind} "
                               f"weights ({', '.join(allowed)})")
    if strategy == "group" and not (isinstance(gs, int) and gs > 0):
        raise QuantConfigError(f"{where}: strategy 'group' needs a positive group_size, got {gs!r}")
    if w.get("actorder") == "group":
        raise QuantConfigError(f"{where}: actorder 'group' (weight_g_idx) is not supported")
    symmetric = bool(w.get("symmetric", True))
    if not symmetric and (kind == "float" or strategy == "tensor"):
        raise QuantConfigError(f"{where}: asymmetric {kind} weights per {strategy} are not "
                               "supported")
    return Scheme(name, fmt, kind, bits, symmetric, strategy,
                  gs if strategy == "group" else None, tuple(group.get("targets") or ()))


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == "Linear"


def hf_memory_name(name: str) -> str:
    """A checkpoint module name as transformers 5 names it in memory (its load-time renames)."""
    for disk, memory in (("thinker.audio_tower.", "thinker.model.audio_tower."),
                         ("thinker.visual.", "thinker.model.visual.")):
        if name.startswith(disk):
            return memory + name[len(disk):]
    if name.startswith("thinker.model.") and not name.startswith(
            ("thinker.model.language_model.", "thinker.model.visual.",
             "thinker.model.audio_tower.")):
        return "thinker.model.language_model." + name[len("thinker.model."):]
    return name
