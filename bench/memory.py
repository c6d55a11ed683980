"""Peak memory of one runtime, in a fresh process of its own.

Runtimes timed side by side share one process, so their memory cannot be told apart there.
Here each runtime is opened in a new interpreter that imports only its own libraries, loads
the model and generates once; the child reports its resident memory after the imports (the
libraries' share) and its peak resident memory after the generation (VmHWM: unlike
`ru_maxrss`, which Linux carries over from the parent across fork and exec, it starts afresh
with the new program). Linux only (/proc/self/status).

    python -m bench.memory '<json request>'   # the child; the harness calls peak_memory()
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.runtimes import Messages, RuntimeSpec, open_raw, pyfunc

LIBRARIES = {
    "transformers": ("torch", "transformers"),
    "transformers-no_grad": ("torch", "transformers"),
    "onnx": ("onnxruntime_genai",),
    "llama.cpp": ("llama_cpp",),
    "pyfunc": ("mlflow",),
    "pyfunc-stream": ("mlflow",),
}


@dataclass(frozen=True)
class Memory:
    libraries_mb: float  # resident after importing the runtime's libraries
    peak_mb: float  # peak resident after loading the model and generating once

    @property
    def model_mb(self) -> float:
        return self.peak_mb - self.libraries_mb


def peak_memory(
    spec: RuntimeSpec, ids: list[int], messages: Messages, new_tokens: int, env: dict[str, str]
) -> Memory:
    request = {"spec": asdict(spec), "ids": ids, "messages": messages, "new_tokens": new_tokens}
    child = subprocess.run(
        [sys.executable, "-m", "bench.memory", json.dumps(request)],
        capture_output=True,
        text=True,
        env=env,
    )
    if child.returncode != 0:
        raise RuntimeError(f"measuring {spec.label}'s memory failed:\n{child.stderr[-3000:]}")
    return Memory(**json.loads(child.stdout.splitlines()[-1]))


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: memory is measured on Linux only")


def _child(request: dict) -> Memory:
    spec = RuntimeSpec(**request["spec"])
    for library in LIBRARIES[spec.kind]:
        __import__(library)
    libraries = _status_mb("VmRSS")
    if spec.kind.startswith("pyfunc"):
        pyfunc(spec.location, stream=spec.kind == "pyfunc-stream")(
            request["messages"], request["new_tokens"]
        )
    else:
        open_raw(spec).generate(request["ids"], request["new_tokens"])
    return Memory(libraries, _status_mb("VmHWM"))


if __name__ == "__main__":
    print(json.dumps(asdict(_child(json.loads(sys.argv[1])))))
