"""`localrun hw`: gather the hardware report and show it (table on a TTY or pipe, or JSON)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rich.markup import escape
from rich.table import Table

from localrun.hardware import BuildInfo, MachineInfo, build_info, machine_info
from localrun.output import Output
from localrun.selftest import Verdict


@dataclass
class HardwareReport:
    machine: MachineInfo
    build: BuildInfo
    selftest: Verdict | None

    @property
    def selftest_ok(self) -> bool:
        return self.selftest is not None and self.selftest.ok

    def to_dict(self) -> dict:
        data = {"machine": self.machine.to_dict(), "llama_cpp": asdict(self.build), "selftest": None}
        if self.selftest is not None:
            v = self.selftest
            data["selftest"] = {
                "ok": v.ok, "use_extra_bufts": v.use_extra_bufts, "advice": v.advice(),
                "fast_path": asdict(v.fast), "safe_path": asdict(v.safe) if v.safe else None,
            }
        return data


def gib(n: int | float) -> str:
    return f"{n / 2**30:.1f} GiB"


def hardware_report(out: Output, selftest: bool = True) -> HardwareReport:
    from localrun import selftest as st

    build = build_info()
    verdict = None
    if selftest:
        if out.interactive:
            with out.err.status("self-test: loading a tiny model in a child process..."):
                verdict = st.check()
        else:
            verdict = st.check()
    return HardwareReport(machine_info(), build, verdict)


def show_hardware(out: Output, report: HardwareReport) -> None:
    if out.json:
        out.data(report.to_dict())
        return
    m, b = report.machine, report.build
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("OS", m.os)
    table.add_row("CPU", f"{m.cpu.model} ({m.cpu.arch})")
    table.add_row("Cores", f"{m.cpu.physical_cores} physical, {m.cpu.logical_cores} logical")
    table.add_row("CPU features", " ".join(m.cpu.features) or "-")
    table.add_row("RAM", f"{gib(m.ram_total)} total, {gib(m.ram_available)} available")
    if m.gpus:
        for i, g in enumerate(m.gpus):
            kind = "unified memory" if g.unified else "VRAM"
            table.add_row(f"GPU {i}", f"{g.name} [{g.backend}]: {gib(g.total_bytes)} {kind}, {gib(g.free_bytes)} free")
    else:
        table.add_row("GPU", escape("none found (NVIDIA needs nvidia-ml-py: pip install 'localrun[nvidia]')"))
    table.add_row("llama-cpp-python", b.version)
    table.add_row("GPU offload", "yes" if b.gpu_offload else "no (CPU-only build)")
    table.add_row("Backends", ", ".join(b.backends) or "-")
    table.add_row("System info", escape(b.system_info))
    if m.cpu.has_amx:
        table.add_row("AMX", "this CPU has AMX; " + ("the build uses it" if b.has_amx else "the build does not use it"))
    v = report.selftest
    if v is not None:
        if v.ok and v.use_extra_bufts:
            status = f"passed: a tiny model loaded and decoded in a child process ({v.fast.seconds}s)"
        elif v.ok:
            status = "passed on the safe path (use_extra_bufts=False)"
        else:
            status = escape(f"FAILED: {v.fast.signal or 'exit ' + str(v.fast.returncode)}: {v.fast.detail[-300:]}")
        table.add_row("Self-test", status)
    out.show(table)
    if v is not None and v.advice():
        out.warn(v.advice())
