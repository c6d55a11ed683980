"""ONNX build specs: a precision plus builder options, written `int4:algo_config=k_quant_last`.

One spec names one build of onnxruntime_genai.models.builder (`-p <precision> --extra_options
<option>=<value> ...`) in config (`compute.onnx_candidates`, `wrap.onnx_build`), in labels
(`onnx-int4-k_quant_last`) and in `python -m bench.*` variants. Specs are checked against the
options the installed builder documents, so a misspelled option fails before any build starts.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

# The builder's --extra_options help lists one option per line as `<name> = <description>`.
_HELP_OPTION = re.compile(r"^ {16}([a-z][a-z0-9_]*) = ", re.MULTILINE)
PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class OnnxBuildSpec:
    precision: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The build as labels and tags name it: builder options change the model, so their
        values follow the precision in the order of their names (`int4-k_quant_last`)."""
        return "-".join([self.precision, *dict(sorted(self.options.items())).values()])

    @property
    def spec(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.precision}:{options}" if options else self.precision


def parse_build_spec(spec: str, setting: str) -> OnnxBuildSpec:
    """`int4:algo_config=k_quant_last,block_size=64` -> OnnxBuildSpec; ValueError names the fix."""
    precision, _, rest = str(spec).partition(":")
    if precision not in PRECISIONS:
        raise ValueError(
            f"{setting}: {spec!r} starts with an unknown precision {precision!r}; write "
            f"<precision>[:<option>=<value>,...] with a precision of {', '.join(PRECISIONS)}"
        )
    pairs = [item for item in rest.split(",") if item]
    if any("=" not in pair for pair in pairs):
        raise ValueError(
            f"{setting}: {spec!r}: write builder options as option=value, separated by commas "
            "(int4:algo_config=k_quant_last,block_size=64)"
        )
    options = dict(pair.split("=", 1) for pair in pairs)
    check_builder_options(options, setting)
    return OnnxBuildSpec(precision, options)


def check_builder_options(options: dict[str, str], setting: str) -> None:
    """ValueError naming the nearest known option where an option is not one the installed
    builder documents."""
    known = builder_options()
    unknown = sorted(set(options) - known) if known else []
    if unknown:
        close = sorted(
            {match for name in unknown for match in difflib.get_close_matches(name, known, n=2)}
        )
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ValueError(
            f"{setting}: the onnxruntime-genai builder has no option {', '.join(unknown)}{hint}; "
            "its options: python -m onnxruntime_genai.models.builder --help"
        )


@functools.cache
def builder_source() -> str:
    """The installed onnxruntime_genai.models.builder's source ("" if it cannot be found), read
    instead of imported: importing it pulls in torch and transformers."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or spec.origin is None:
        return ""
    builder = Path(spec.origin).parent / "models" / "builder.py"
    return builder.read_text() if builder.is_file() else ""


@functools.cache
def builder_options() -> frozenset[str]:
    """The --extra_options the installed builder documents (empty if it cannot be read: then
    the builder itself is the check)."""
    source = builder_source()
    start = source.find('"--extra_options"')
    end = source.find("parser.add_argument", start)
    return frozenset(_HELP_OPTION.findall(source[start:end])) if start >= 0 else frozenset()
