"""Inference engines behind one interface, and the one rule that picks an engine and a precision per tower.

Every tower keeps the same contract whatever runs it: a batch of images (`[N, 3, S, S]` float32, or `[N, S, S, 3]`
bytes for a file that takes those) or of token ids (`[N, L]`, with an attention mask for a file that takes one)
in, `[N, dim]` unit vectors out; `common.Feed` adapts it to what the file declares. `plan()` decides from the
settings (`IDIOS_ENGINE`, `IDIOS_PRECISION`, `IDIOS_EXECUTION_PROVIDER`), what the manifest says of the model
(its weights, its measured bf16 fidelity) and what this machine has (OpenVINO, a CPU with bf16); `open_tower()`
builds what it decided."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from idios.engines.common import Feed
from idios.engines.onnxruntime import CPU, OrtTower, providers_for

log = logging.getLogger(__name__)

ENGINES = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
BF16_MIN_COSINE = 0.999  # the least bf16-vs-fp32 cosine, over the measured items, for `auto` to run bf16


class Tower(Protocol):
    """A loaded tower: `run` maps a batch to unit vectors; the rest says what runs it."""

    engine: str
    precision: str
    device: str
    feed: Feed  # how its file takes its inputs (names, element types, fixed batch size, dynamic length)

    def run(self, batch: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class Machine:
    """What this process can run on: OpenVINO's CPU capabilities (None without OpenVINO) and the onnxruntime
    providers resolved from IDIOS_EXECUTION_PROVIDER (CPU last)."""

    openvino: frozenset[str] | None
    providers: tuple[str, ...]

    @property
    def bf16(self) -> bool:
        return self.openvino is not None and "BF16" in self.openvino

    @property
    def accelerator(self) -> str | None:
        return None if self.providers[0] == CPU else self.providers[0]


@dataclass(frozen=True)
class TowerWeights:
    """What a manifest says of one tower's file: its weights and, for float models, how bf16 held up."""

    path: Path
    weights: str = "fp32"  # "fp32" or "int8"
    made_for: str | None = None  # the engine an int8 file was quantised for
    bf16_min_cosine: float | None = None  # measured against fp32 on real inputs; None = never measured


@dataclass(frozen=True)
class EnginePlan:
    engine: str
    precision: str
    reason: str
    warning: str | None = None  # something asked for that does not run: said at start-up, once per tower

    @property
    def runs(self) -> tuple[str, str]:
        return self.engine, self.precision


def check_names(engine: str, precision: str) -> None:
    """A name that is no engine or precision stops start-up (main() turns this into one line)."""
    if engine not in ENGINES:
        raise ValueError(f"IDIOS_ENGINE={engine!r}: use one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"IDIOS_PRECISION={precision!r}: use one of {', '.join(PRECISIONS)}")


def plan(tower: TowerWeights, engine: str, precision: str, machine: Machine) -> EnginePlan:
    """The engine and precision one tower runs on, and why (logged at start-up)."""
    check_names(engine, precision)
    if tower.weights == "int8":
        return _plan_int8(tower, engine, precision, machine)
    if machine.accelerator and engine != "openvino":
        return EnginePlan("onnxruntime", "fp32", f"execution provider {machine.accelerator} is set",
                          _no_bf16(precision, "onnxruntime on an accelerator"))
    if engine == "onnxruntime":
        return EnginePlan("onnxruntime", "fp32", "IDIOS_ENGINE=onnxruntime",
                          _no_bf16(precision, "onnxruntime's CPU kernels"))
    if machine.openvino is None:
        warn = "IDIOS_ENGINE=openvino, but OpenVINO is not available here: running onnxruntime fp32"
        return EnginePlan("onnxruntime", "fp32", "OpenVINO is not available here",
                          warn if engine == "openvino" else _no_bf16(precision, "onnxruntime's CPU kernels"))
    chosen = "IDIOS_ENGINE=openvino" if engine == "openvino" else "OpenVINO reads the ONNX file"
    return _plan_openvino_float(tower, precision, machine, chosen)


def _plan_openvino_float(tower: TowerWeights, precision: str, machine: Machine, chosen: str) -> EnginePlan:
    fidelity = tower.bf16_min_cosine
    if precision == "fp32":
        return EnginePlan("openvino", "fp32", f"{chosen}; IDIOS_PRECISION=fp32")
    if not machine.bf16:
        warn = "IDIOS_PRECISION=bf16, but this CPU has no bf16: running fp32" if precision == "bf16" else None
        return EnginePlan("openvino", "fp32", f"{chosen}; this CPU has no bf16 (AMX or AVX-512 BF16)",
                          warn or _no_int8(precision))
    if precision == "bf16":
        low = fidelity is not None and fidelity < BF16_MIN_COSINE
        warn = f"IDIOS_PRECISION=bf16 although bf16 measured min cosine {fidelity:.5f} to fp32" if low else None
        return EnginePlan("openvino", "bf16", f"{chosen}; IDIOS_PRECISION=bf16", warn)
    if fidelity is None:
        return EnginePlan("openvino", "fp32", f"{chosen}; bf16 fidelity never measured for this model "
                          "(python -m idios fidelity measures it)", _no_int8(precision))
    if fidelity < BF16_MIN_COSINE:
        return EnginePlan("openvino", "fp32", f"{chosen}; bf16 measured min cosine {fidelity:.5f} to fp32, "
                          f"under {BF16_MIN_COSINE}", _no_int8(precision))
    return EnginePlan("openvino", "bf16", f"{chosen}; CPU has bf16 and the model holds it (min cosine "
                      f"{fidelity:.5f} to fp32)", _no_int8(precision))


def _plan_int8(tower: TowerWeights, engine: str, precision: str, machine: Machine) -> EnginePlan:
    warn = None if precision in ("auto", "int8") else f"IDIOS_PRECISION={precision}, but the weights are int8"
    made_for = tower.made_for or "onnxruntime"
    if engine == "auto":
        engine = made_for if made_for != "openvino" or machine.openvino is not None else "onnxruntime"
    if engine == "openvino" and machine.openvino is None:
        return EnginePlan("onnxruntime", "int8", "OpenVINO is not available here",
                          "IDIOS_ENGINE=openvino, but OpenVINO is not available here: running onnxruntime")
    if engine == "onnxruntime" and tower.path.suffix != ".onnx":
        raise ValueError(f"{tower.path.name} is an OpenVINO file: onnxruntime cannot run it (IDIOS_ENGINE)")
    return EnginePlan(engine, "int8", f"int8 weights quantised for {made_for}", warn)


def _no_bf16(precision: str, what: str) -> str | None:
    return f"IDIOS_PRECISION=bf16, but {what} run fp32" if precision == "bf16" else _no_int8(precision)


def _no_int8(precision: str) -> str | None:
    return ("IDIOS_PRECISION=int8, but this model has float weights (export an int8 copy: "
            "scripts/export_model.py --int8-static)") if precision == "int8" else None


def open_tower(tower: TowerWeights, chosen: EnginePlan, machine: Machine, threads: int, spin: bool = True,
               cache: Path | None = None) -> Tower:
    """Build the tower `plan()` chose (`cache`: OpenVINO's compiled-model cache folder, None for none)."""
    if chosen.engine == "openvino":
        from idios.engines.openvino import OpenVinoTower

        return OpenVinoTower(tower.path, threads, chosen.precision, cache)
    return OrtTower(tower.path, threads, list(machine.providers), spin, chosen.precision)


def detect_machine(execution_provider: str) -> Machine:
    """OpenVINO's capabilities and the onnxruntime providers of this process."""
    from idios.engines.openvino import cpu_capabilities

    caps = cpu_capabilities()
    return Machine(None if caps is None else frozenset(caps), providers_for(execution_provider))
