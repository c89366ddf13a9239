"""Declared key maps: image-encoder checkpoints written by another library, renamed to timm's names.

A ``KeyMap`` is an ordered list of ``(regex, replacement)`` rules (``re.sub`` syntax; the first rule that matches a
key wins; replacement ``None`` drops the tensor); a key no rule matches is an error, so a map either covers a
checkpoint entirely or says which key it does not know. Libraries that number blocks across all stages
(``_blocks.11.``) where timm nests them per stage (``blocks.4.1.``) declare ``flat_blocks``: that prefix's flat
index is first rewritten ``<prefix>.<stage>.<index>.`` from the target model's stage depths, so rules can
address a stage.

Use one by name (``key_map: efficientnet_pytorch`` in the image encoder's kwargs) or declare one inline::

    key_map: {flat_blocks: _blocks, rules: [["^_conv_stem\\.", "conv_stem."], ...]}
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import Tensor


@dataclass(frozen=True)
class KeyMap:
    rules: tuple[tuple[str, str | None], ...]
    flat_blocks: str | None = None  # e.g. "_blocks": "_blocks.<n>." numbered over all stages

    @classmethod
    def parse(cls, spec: Any) -> "KeyMap":
        """A registered name, a ``KeyMap``, or ``{"rules": [[pattern, replacement], ...], "flat_blocks": ...}``."""
        if isinstance(spec, KeyMap):
            return spec
        if isinstance(spec, str):
            if spec not in KEY_MAPS:
                raise ValueError(f"image encoder key_map={spec!r} is not a declared key map; choose one of "
                                 f"{sorted(KEY_MAPS)} or give {{rules: [[pattern, replacement], ...]}}")
            return KEY_MAPS[spec]
        if isinstance(spec, Mapping) and set(spec) <= {"rules", "flat_blocks"} and "rules" in spec:
            rules = []
            for rule in spec["rules"]:
                if not isinstance(rule, Sequence) or isinstance(rule, str) or len(rule) != 2:
                    raise ValueError(f"image encoder key_map rule {rule!r}: expected [regex, replacement or null]")
                try:
                    re.compile(rule[0])
                except re.error as err:
                    raise ValueError(f"image encoder key_map rule {rule!r}: bad regex ({err})") from err
                rules.append((str(rule[0]), None if rule[1] is None else str(rule[1])))
            return cls(tuple(rules), spec.get("flat_blocks"))
        raise ValueError(f"image encoder key_map: expected a name ({sorted(KEY_MAPS)}) or a mapping with 'rules' "
                         f"(and optionally 'flat_blocks'), got {spec!r}")

    def apply(self, state_dict: Mapping[str, Tensor], stage_depths: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Renamed ``state_dict``; ``stage_depths`` (blocks per stage of the target model) when ``flat_blocks``."""
        out: dict[str, Tensor] = {}
        unknown = []
        for key, value in state_dict.items():
            name = self._nest(key, stage_depths)
            for pattern, replacement in self.rules:
                if re.search(pattern, name):
                    if replacement is not None:
                        out[re.sub(pattern, replacement, name, count=1)] = value
                    break
            else:
                unknown.append(key)
        if unknown:
            raise KeyError(f"image encoder key_map: no rule for {len(unknown)} checkpoint keys, e.g. {unknown[:6]}")
        return out

    def _nest(self, key: str, stage_depths: Sequence[int] | None) -> str:
        if not self.flat_blocks:
            return key
        match = re.match(rf"^{re.escape(self.flat_blocks)}\.(\d+)\.", key)
        if match is None:
            return key
        if not stage_depths:
            raise ValueError(f"image encoder key_map: flat block numbering ({self.flat_blocks}) needs a target model "
                             f"with stages of blocks (timm's blocks[stage][index])")
        flat = int(match.group(1))
        for stage, depth in enumerate(stage_depths):
            if flat < depth:
                return f"{self.flat_blocks}.{stage}.{flat}.{key[match.end():]}"
            flat -= depth
        raise KeyError(f"image encoder key_map: checkpoint key {key!r} is block {match.group(1)}, but the target "
                       f"model has {sum(stage_depths)} blocks (stages {list(stage_depths)})")


_IR = r"^_blocks\.([1-9]\d*\.\d+)\."  # inverted-residual blocks: every stage after the first
_DS = r"^_blocks\.(0\.\d+)\."  # depthwise-separable blocks: the first stage (expansion ratio 1)

KEY_MAPS: dict[str, KeyMap] = {
    # EfficientNet-PyTorch (lukemelas/EfficientNet-PyTorch and its Lite ports) -> timm efficientnet_b*,
    # tf_efficientnet_b*, tf_efficientnet_lite*.
    "efficientnet_pytorch": KeyMap(
        flat_blocks="_blocks",
        rules=(
            (r"^_conv_stem\.", "conv_stem."),
            (r"^_bn0\.", "bn1."),
            (r"^_conv_head\.", "conv_head."),
            (r"^_bn1\.", "bn2."),
            (r"^_fc\.", "classifier."),
            (_DS + r"_depthwise_conv\.", r"blocks.\1.conv_dw."),
            (_DS + r"_bn1\.", r"blocks.\1.bn1."),
            (_DS + r"_se_reduce\.", r"blocks.\1.se.conv_reduce."),
            (_DS + r"_se_expand\.", r"blocks.\1.se.conv_expand."),
            (_DS + r"_project_conv\.", r"blocks.\1.conv_pw."),
            (_DS + r"_bn2\.", r"blocks.\1.bn2."),
            (_IR + r"_expand_conv\.", r"blocks.\1.conv_pw."),
            (_IR + r"_bn0\.", r"blocks.\1.bn1."),
            (_IR + r"_depthwise_conv\.", r"blocks.\1.conv_dw."),
            (_IR + r"_bn1\.", r"blocks.\1.bn2."),
            (_IR + r"_se_reduce\.", r"blocks.\1.se.conv_reduce."),
            (_IR + r"_se_expand\.", r"blocks.\1.se.conv_expand."),
            (_IR + r"_project_conv\.", r"blocks.\1.conv_pwl."),
            (_IR + r"_bn2\.", r"blocks.\1.bn3."),
        ),
    ),
}
