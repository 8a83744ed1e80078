import { describe, expect, it } from "vitest";
import {
  buildProbeKernel,
  firstQemuComplaint,
  judgeProbeRun,
  PROBE_EXIT_STATUS,
  type ProbeRunOutcome,
} from "./probe-guest.js";

describe("buildProbeKernel", () => {
  it("starts with a multiboot header that QEMU accepts (a.out kludge, checksum, 1 MiB load address)", () => {
    const image = buildProbeKernel();
    const v = new DataView(image.buffer, image.byteOffset, image.byteLength);
    const word = (i: number) => v.getUint32(i * 4, true);
    expect(word(0)).toBe(0x1badb002);
    expect(word(1)).toBe(0x0001_0000);
    expect((word(0) + word(1) + word(2)) >>> 0).toBe(0);
    expect([word(3), word(4), word(5), word(6), word(7)]).toEqual([
      0x100000,
      0x100000,
      0x100000 + image.length,
      0,
      0x100020,
    ]);
    // QEMU looks for a Linux header ("HdrS" at 0x202) before multiboot: that read stays in the image.
    expect(image.length).toBeGreaterThan(0x206);
  });

  it("spins, then writes 0x31 to port 0xf4 and halts", () => {
    const code = [...buildProbeKernel(0x01020304).subarray(32, 32 + 15)];
    expect(code).toEqual([
      0xb9, 0x04, 0x03, 0x02, 0x01, 0x49, 0x75, 0xfd, 0xb0, 0x31, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd,
    ]);
    expect([...buildProbeKernel(0).subarray(32, 40)]).toEqual([0xb0, 0x31, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd, 0]);
    expect(PROBE_EXIT_STATUS).toBe(99);
  });

  it("rejects a spin count the loop cannot hold", () => {
    expect(() => buildProbeKernel(-1)).toThrow(RangeError);
    expect(() => buildProbeKernel(2 ** 32)).toThrow(RangeError);
    expect(() => buildProbeKernel(1.5)).toThrow(RangeError);
  });
});

describe("judgeProbeRun", () => {
  const run = (over: Partial<ProbeRunOutcome>): ProbeRunOutcome => ({
    exitCode: undefined,
    signal: undefined,
    timedOut: false,
    spawnErrorCode: undefined,
    stderr: "",
    qemuPath: "/usr/bin/qemu-system-x86_64",
    durationMs: 41.4,
    timeoutMs: 3000,
    ...over,
  });

  it("is usable only when the guest reached isa-debug-exit", () => {
    expect(judgeProbeRun(run({ exitCode: 99 }))).toEqual({
      usable: true,
      detail: "probe guest exited through isa-debug-exit in 41 ms",
    });
  });

  it("says the guest hangs when the time ran out", () => {
    expect(judgeProbeRun(run({ timedOut: true, signal: "SIGKILL" }))).toEqual({
      usable: false,
      detail: "probe guest did not finish within 3s (guest hangs)",
    });
    expect(judgeProbeRun(run({ timedOut: true, timeoutMs: 1500 })).detail).toBe(
      "probe guest did not finish within 1500 ms (guest hangs)",
    );
  });

  it("quotes QEMU's first complaint, skipping warnings", () => {
    const stderr =
      "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\n" +
      "Could not access KVM kernel module: No such file or directory\n" +
      "qemu-system-x86_64: failed to initialize kvm: No such file or directory\n";
    expect(judgeProbeRun(run({ exitCode: 1, stderr }))).toEqual({
      usable: false,
      detail: "qemu: Could not access KVM kernel module: No such file or directory",
    });
    expect(firstQemuComplaint("qemu-system-x86_64: -accel bogus: invalid accelerator bogus\n")).toBe(
      "-accel bogus: invalid accelerator bogus",
    );
    expect(firstQemuComplaint("/usr/libexec/qemu-kvm: warning: x\n")).toBeUndefined();
  });

  it("explains the other endings", () => {
    expect(judgeProbeRun(run({ spawnErrorCode: "ENOENT", qemuPath: "/nope/qemu" })).detail).toBe(
      "QEMU binary /nope/qemu not found",
    );
    expect(judgeProbeRun(run({ exitCode: 0 })).detail).toMatch(
      /reset or shut down before reaching isa-debug-exit/,
    );
    expect(judgeProbeRun(run({ signal: "SIGSEGV" })).detail).toBe("QEMU was ended by SIGSEGV after 41 ms");
    expect(judgeProbeRun(run({ exitCode: 3 })).detail).toBe("QEMU exited with status 3 without a message");
  });
});
