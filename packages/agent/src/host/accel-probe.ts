/**
 * Accelerator probe (adapter): decides whether an accelerator is usable by running a tiny guest on it
 * (see `probe-guest.ts`), not by looking for /dev/kvm. A host can have /dev/kvm and still be unable to
 * run guests at a useful speed (nested virtualisation that does not work, a software KVM provider).
 */
import { mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import type { AcceleratorInfo, AcceleratorKind } from "./inventory.js";
import { buildProbeKernel, judgeProbeRun } from "./probe-guest.js";

/** Default time the probe guest gets, QEMU start included. */
export const DEFAULT_PROBE_TIMEOUT_MS = 3000;

export interface AccelProbeOptions {
  /** QEMU system emulator to run (x86-64: the probe guest is an x86 multiboot kernel). */
  qemuPath: string;
  /** QEMU accelerator name given to `-accel`: "kvm", "tcg" (any other name is passed on as is). */
  accel: string;
  /** Time limit for the whole run, QEMU start included; QEMU is killed when it runs out. Default 3000. */
  timeoutMs?: number;
  /** Aborting kills QEMU and rejects the probe with the signal's reason. */
  signal?: AbortSignal;
  /** KVM device node; a missing one makes a "kvm" probe fail without starting QEMU. Default /dev/kvm. */
  devKvmPath?: string;
  /** Folder under which the probe makes (and always removes) its temporary folder. Default: os.tmpdir(). */
  tmpDir?: string;
  /** Loop iterations the guest runs before it exits (see `probe-guest.ts`). */
  spinIterations?: number;
  /** Monotonic milliseconds. Default: performance.now. */
  now?: () => number;
}

export interface AccelProbeResult {
  /** The guest ran to its exit within the time limit. */
  usable: boolean;
  /** One line saying what happened. */
  detail: string;
  /** Wall time of the QEMU run (0 when none was started). */
  durationMs: number;
}

/**
 * Runs the probe guest under `qemuPath -accel <accel>` and reports whether it finished. Never leaves a
 * QEMU process or temporary file behind, whatever happens; rejects only when `signal` aborts.
 */
export async function probeAccelerator(options: AccelProbeOptions): Promise<AccelProbeResult> {
  const { qemuPath, accel, signal } = options;
  const timeoutMs = options.timeoutMs ?? DEFAULT_PROBE_TIMEOUT_MS;
  const now = options.now ?? (() => performance.now());
  signal?.throwIfAborted();

  if (accel === "kvm") {
    const devKvm = options.devKvmPath ?? "/dev/kvm";
    if (!(await exists(devKvm))) return { usable: false, detail: `${devKvm} not present`, durationMs: 0 };
  }

  const dir = await mkdtemp(join(options.tmpDir ?? tmpdir(), "vmenv-accel-probe-"));
  try {
    const kernel = join(dir, "probe-guest.bin");
    await writeFile(kernel, buildProbeKernel(options.spinIterations));
    // biome-ignore format: one QEMU option per line
    const args = [
      "-name", `vmenv-accel-probe-${accel}`,
      "-no-user-config",
      "-nodefaults",
      "-accel", accel,
      "-machine", "pc",
      "-display", "none",
      "-no-reboot",
      "-m", "16",
      "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
      "-kernel", kernel,
    ];
    const started = now();
    const run = await execa(qemuPath, args, {
      timeout: timeoutMs,
      ...(signal ? { cancelSignal: signal } : {}),
      // Nothing in a probe is worth a graceful shutdown: SIGKILL on timeout and on cancel.
      killSignal: "SIGKILL",
      forceKillAfterDelay: false,
      reject: false,
      stdin: "ignore",
      stdout: "ignore",
      stderr: "pipe",
      maxBuffer: 64 * 1024,
      // Kill QEMU if the agent itself exits while the probe runs.
      cleanup: true,
    });
    const durationMs = now() - started;
    if (run.isCanceled) signal?.throwIfAborted();
    const verdict = judgeProbeRun({
      exitCode: run.exitCode,
      signal: run.signal,
      timedOut: run.timedOut,
      spawnErrorCode: run.exitCode === undefined && run.signal === undefined ? run.code : undefined,
      stderr: typeof run.stderr === "string" ? run.stderr : "",
      qemuPath,
      durationMs,
      timeoutMs,
    });
    return { ...verdict, durationMs };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export interface AcceleratorsProbeOptions {
  /** QEMU binary to probe with (`StaticHostFacts.qemuPath`); undefined when none was found. */
  qemuPath: string | undefined;
  timeoutMs?: number;
  signal?: AbortSignal;
  devKvmPath?: string;
  /** sysfs root, to name the loaded KVM vendor module in the detail. Default "/sys". */
  sysRoot?: string;
  tmpDir?: string;
  spinIterations?: number;
  now?: () => number;
}

/**
 * Probes TCG, then KVM (one after the other, so that neither slows the other down) and reports both.
 * A failed KVM probe names the KVM vendor module loaded (kvm_intel, kvm_amd, or e.g. kvm_pvm, a
 * software provider that runs guests far too slowly), which usually says why.
 */
export async function probeAccelerators(options: AcceleratorsProbeOptions): Promise<AcceleratorInfo[]> {
  const devKvm = options.devKvmPath ?? "/dev/kvm";
  const kvmPresent = await exists(devKvm);
  const qemuPath = options.qemuPath;
  const out: AcceleratorInfo[] = [];
  for (const kind of ["tcg", "kvm"] as const satisfies readonly AcceleratorKind[]) {
    const present = kind === "kvm" ? kvmPresent : qemuPath !== undefined;
    if (qemuPath === undefined) {
      const detail = kind === "kvm" && !kvmPresent ? `${devKvm} not present` : "cannot probe: no QEMU binary";
      out.push({ kind, present, usable: false, detail, probeDurationMs: 0 });
      continue;
    }
    const result = await probeAccelerator({
      qemuPath,
      accel: kind,
      devKvmPath: devKvm,
      timeoutMs: options.timeoutMs,
      signal: options.signal,
      tmpDir: options.tmpDir,
      spinIterations: options.spinIterations,
      now: options.now,
    });
    let detail = result.detail;
    if (kind === "kvm" && present && !result.usable) {
      const modules = await kvmVendorModules(options.sysRoot ?? "/sys");
      if (modules.length > 0) detail += ` (KVM provided by ${modules.join(", ")})`;
    }
    out.push({
      kind,
      present,
      usable: result.usable,
      detail,
      probeDurationMs: Math.round(result.durationMs),
    });
  }
  return out;
}

const KVM_VENDOR_MODULES = ["kvm_intel", "kvm_amd", "kvm_pvm"];

async function kvmVendorModules(sysRoot: string): Promise<string[]> {
  const found = await Promise.all(KVM_VENDOR_MODULES.map((m) => exists(join(sysRoot, "module", m))));
  return KVM_VENDOR_MODULES.filter((_, i) => found[i]);
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}
