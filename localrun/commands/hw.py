"""`localrun hw`: the machine, the llama.cpp build and a self-test, as a report or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from localrun import hardware
from localrun.hardware import Machine
from localrun.inference.llama import rpc
from localrun.inference.llama.build import BuildInfo, build_info
from localrun.inference.safety import selftest
from localrun.inference.safety.selftest import Verdict
from localrun.output import Output
from localrun.text import human_bytes


@dataclass
class HardwareReport:
    machine: Machine
    build: BuildInfo
    selftest: Verdict | None
    rpc: bool = False  # the build has llama.cpp's RPC backend (`localrun worker`, --rpc)

    @property
    def selftest_ok(self) -> bool:
        return self.selftest is not None and self.selftest.ok

    def to_dict(self) -> dict:
        build = dict(asdict(self.build), rpc=self.rpc)
        data = {"machine": self.machine.to_dict(), "llama_cpp": build, "selftest": None}
        if self.selftest is not None:
            v = self.selftest
            data["selftest"] = {
                "ok": v.ok,
                "use_extra_bufts": v.use_extra_bufts,
                "advice": v.advice(),
                "fast_path": asdict(v.fast),
                "safe_path": asdict(v.safe) if v.safe else None,
            }
        return data


def hardware_report(out: Output, run_selftest: bool = True, workers: tuple = ()) -> HardwareReport:
    build = build_info()
    verdict = None
    if run_selftest:
        if out.interactive:
            with out.err.status("self-test: loading a tiny model in a child process..."):
                verdict = selftest.check()
        else:
            verdict = selftest.check()
    machine = hardware.detect().with_workers(workers)
    if verdict is not None and verdict.use_extra_bufts is not None:
        machine = machine.with_extra_bufts(verdict.use_extra_bufts)
    return HardwareReport(machine, build, verdict, rpc.supported())


def _gpu_rows(m: Machine) -> list[tuple[str, str]]:
    rows = []
    for i, g in enumerate(m.gpus):
        kind = "unified memory" if g.unified else "VRAM"
        rows.append((f"GPU {i}", f"{g.name} [{g.backend}]: {human_bytes(g.total)} {kind}, {human_bytes(g.free)} free"))
    if not rows:
        missing_nvml = hardware.nvidia_driver_present() and not hardware.nvml_available()
        rows.append(
            (
                "GPU",
                "an NVIDIA driver is loaded, but nvidia-ml-py is missing: pip install 'localrun[nvidia]'"
                if missing_nvml
                else "none found",
            )
        )
    return rows


def show_hardware(out: Output, report: HardwareReport) -> None:
    if out.json:
        out.data(report.to_dict())
        return
    m, b = report.machine, report.build
    rows = [
        ("OS", m.os),
        ("CPU", f"{m.cpu.model} ({m.cpu.arch})"),
        ("Cores", f"{m.cpu.physical_cores} physical, {m.cpu.logical_cores} logical"),
        ("CPU features", " ".join(m.cpu.features) or "-"),
        ("RAM", f"{human_bytes(m.ram_total)} total, {human_bytes(m.ram_available)} available"),
        *_gpu_rows(m),
        ("llama-cpp-python", b.version),
        ("GPU offload", "yes" if b.gpu_offload else "no (CPU-only build)"),
        ("Backends", ", ".join(b.backends) or "-"),
        ("RPC", "yes: `localrun worker` and --rpc" if report.rpc else f"no: rebuild with {rpc.rebuild_command()}"),
        *[(f"Worker {w.endpoint}", f"protocol {w.version}, {w.describe()}") for w in m.workers],
        ("System info", b.system_info),
    ]
    if m.cpu.has_amx:
        rows.append(("AMX", "this CPU has AMX; " + ("the build uses it" if b.has_amx else "the build does not use it")))
    v = report.selftest
    if v is not None:
        if v.ok and v.use_extra_bufts:
            status = f"passed: a tiny model loaded and decoded in a child process ({v.fast.seconds}s)"
        elif v.ok:
            status = "passed on the safe path (use_extra_bufts=False)"
        else:
            status = f"FAILED: {v.fast.signal or 'exit ' + str(v.fast.returncode)}: {v.fast.detail[-300:]}"
        rows.append(("Self-test", status))
    out.fields(rows)
    if v is not None and v.advice():
        out.warn(v.advice())
