import { mkdtemp, readdir, readFile, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { probeAccelerator, probeAccelerators } from "../packages/agent/src/host/accel-probe.js";
import { findExecutable } from "../packages/agent/src/host/qemu.js";

// QEMU is part of the test environment (scripts/setup installs it): missing, these tests fail, not skip.
const qemuPath = await findExecutable("qemu-system-x86_64", process.env.PATH ?? "");
if (qemuPath === undefined) throw new Error("qemu-system-x86_64 not found on PATH: run scripts/setup");
const kvmPresent = await stat("/dev/kvm").then(
  () => true,
  () => false,
);

/** Pids of live processes whose command line mentions `text` (the probe's unique temp folder). */
async function processesMentioning(text: string): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const cmdline = await readFile(`/proc/${name}/cmdline`, "utf8");
      if (cmdline.includes(text)) pids.push(Number(name));
    } catch {
      // The process ended while we looked.
    }
  }
  return pids;
}

// Every test gives the probe its own parent folder, so a leftover QEMU (its -kernel argument lies in
// that folder) can be found, killed and reported, and the folder removed, even when the test fails.
let parent: string;
beforeEach(async () => {
  parent = await mkdtemp(join(tmpdir(), "vmenv-accel-probe-test-"));
});
afterEach(async () => {
  const leftovers = await processesMentioning(parent);
  for (const pid of leftovers) process.kill(pid, "SIGKILL");
  await rm(parent, { recursive: true, force: true });
  expect(leftovers, "QEMU processes left behind").toEqual([]);
});

/** The probe removed its temporary folder. */
async function expectNoTempFiles() {
  expect(await readdir(parent)).toEqual([]);
}

describe("probeAccelerator with the QEMU installed here", () => {
  const qemu = qemuPath ?? "";

  it("runs the probe guest to its exit under TCG", async () => {
    const result = await probeAccelerator({ qemuPath: qemu, accel: "tcg", tmpDir: parent });
    expect(result.detail).toMatch(/^probe guest exited through isa-debug-exit in \d+ ms$/);
    expect(result.usable).toBe(true);
    expect(result.durationMs).toBeGreaterThan(0);
    expect(result.durationMs).toBeLessThan(3000);
    await expectNoTempFiles();
  });

  it("reports a guest that does not finish in time as hanging, and kills QEMU", async () => {
    // 2^32-1 iterations take tens of seconds under TCG: the time limit runs out first.
    const result = await probeAccelerator({
      qemuPath: qemu,
      accel: "tcg",
      timeoutMs: 1000,
      spinIterations: 0xffff_ffff,
      tmpDir: parent,
    });
    expect(result).toMatchObject({
      usable: false,
      detail: "probe guest did not finish within 1s (guest hangs)",
    });
    expect(result.durationMs).toBeGreaterThanOrEqual(1000);
    expect(result.durationMs).toBeLessThan(2000);
    expect(await processesMentioning(parent)).toEqual([]);
    await expectNoTempFiles();
  });

  it("rejects with the abort reason when cancelled, and kills QEMU", async () => {
    const controller = new AbortController();
    const started = performance.now();
    const probe = probeAccelerator({
      qemuPath: qemu,
      accel: "tcg",
      spinIterations: 0xffff_ffff,
      timeoutMs: 10_000,
      signal: controller.signal,
      tmpDir: parent,
    });
    setTimeout(() => controller.abort(new Error("agent shutting down")), 300);
    await expect(probe).rejects.toThrow("agent shutting down");
    expect(performance.now() - started).toBeLessThan(2000);
    expect(await processesMentioning(parent)).toEqual([]);
    await expectNoTempFiles();
  });

  it("reports an accelerator QEMU does not know with QEMU's own words", async () => {
    const result = await probeAccelerator({ qemuPath: qemu, accel: "bogus", tmpDir: parent });
    expect(result.usable).toBe(false);
    expect(result.detail).toMatch(/^qemu: .*bogus/);
    await expectNoTempFiles();
  });

  it("says when the KVM device node is missing, without starting QEMU", async () => {
    const result = await probeAccelerator({
      qemuPath: qemu,
      accel: "kvm",
      devKvmPath: join(parent, "kvm"),
      tmpDir: parent,
    });
    expect(result).toEqual({ usable: false, detail: `${join(parent, "kvm")} not present`, durationMs: 0 });
  });

  it("probes TCG and KVM; KVM is usable exactly when its guest finished, within the time limit", async () => {
    const timeoutMs = 3000;
    const started = performance.now();
    const accels = await probeAccelerators({ qemuPath: qemu, timeoutMs, tmpDir: parent });
    const elapsed = performance.now() - started;
    expect(accels.map((a) => a.kind)).toEqual(["tcg", "kvm"]);
    const [tcg, kvm] = accels;
    expect(tcg).toMatchObject({ present: true, usable: true });
    expect(kvm?.present).toBe(kvmPresent);
    if (!kvm?.present) expect(kvm?.usable).toBe(false);
    expect(kvm?.usable).toBe(/^probe guest exited through isa-debug-exit/.test(kvm?.detail ?? ""));
    expect(kvm?.probeDurationMs).toBeLessThan(timeoutMs + 1000);
    expect(elapsed).toBeLessThan((tcg?.probeDurationMs ?? 0) + timeoutMs + 1000);
    console.info(`accelerator probes here: ${accels.map((a) => `${a.kind}: ${a.detail}`).join("; ")}`);
    await expectNoTempFiles();
  });
});

describe("probeAccelerator without QEMU", () => {
  it("says the binary is missing", async () => {
    const missing = join(parent, "no-such-qemu");
    const result = await probeAccelerator({ qemuPath: missing, accel: "tcg", tmpDir: parent });
    expect(result).toMatchObject({ usable: false, detail: `QEMU binary ${missing} not found` });
    await expectNoTempFiles();
  });

  it("reports both accelerators as not usable when no QEMU was found", async () => {
    const accels = await probeAccelerators({ qemuPath: undefined, devKvmPath: join(parent, "kvm") });
    expect(accels).toEqual([
      {
        kind: "tcg",
        present: false,
        usable: false,
        detail: "cannot probe: no QEMU binary",
        probeDurationMs: 0,
      },
      {
        kind: "kvm",
        present: false,
        usable: false,
        detail: `${join(parent, "kvm")} not present`,
        probeDurationMs: 0,
      },
    ]);
  });

  it("rejects at once when the signal is already aborted", async () => {
    await expect(
      probeAccelerator({
        qemuPath: "qemu",
        accel: "tcg",
        signal: AbortSignal.abort(new Error("no")),
        tmpDir: parent,
      }),
    ).rejects.toThrow("no");
    await expectNoTempFiles();
  });
});
