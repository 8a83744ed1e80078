import { chmod, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { discoverVmms, findCloudHypervisor, findExecutable, findQemu, qemuBinaryName } from "./qemu.js";

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "vmenv-qemu-test-"));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A stand-in binary: a shell script printing `output` (the kernel runs it through its #! line). */
async function fakeBinary(name: string, output: string, exitCode = 0): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, `#!/bin/sh\nprintf '%s\\n' '${output}'\nexit ${exitCode}\n`);
  await chmod(path, 0o755);
  return path;
}

const realQemu = await findExecutable("qemu-system-x86_64", process.env.PATH ?? "");

describe("qemuBinaryName", () => {
  it("maps Node.js architecture names to QEMU's", () => {
    expect(qemuBinaryName("x64")).toBe("qemu-system-x86_64");
    expect(qemuBinaryName("arm64")).toBe("qemu-system-aarch64");
    expect(qemuBinaryName("riscv64")).toBe("qemu-system-riscv64");
  });
});

describe("findQemu with the QEMU installed here", () => {
  it("finds qemu-system-x86_64 on PATH and reads its version", async () => {
    const qemu = await findQemu({ architecture: "x64" });
    expect(qemu).toMatchObject({
      kind: "qemu",
      path: realQemu,
      available: true,
      unavailableReason: undefined,
    });
    expect(qemu.version).toMatch(/^\d+\.\d+(\.\d+)?$/);
  });
});

describe("findQemu", () => {
  it("uses a configured path as is", async () => {
    const path = await fakeBinary("my-qemu", "QEMU emulator version 9.1.0 (v9.1.0)");
    expect(await findQemu({ qemuPath: path, searchPath: "" })).toEqual({
      kind: "qemu",
      path,
      version: "9.1.0",
      available: true,
      unavailableReason: undefined,
    });
  });

  it("says which configured binary is missing", async () => {
    const qemu = await findQemu({ qemuPath: join(dir, "nope", "qemu-system-x86_64") });
    expect(qemu.available).toBe(false);
    expect(qemu.path).toBeUndefined();
    expect(qemu.unavailableReason).toBe(
      `configured QEMU binary ${join(dir, "nope", "qemu-system-x86_64")} not found or not executable`,
    );
  });

  it("looks a bare name up on the search path, by architecture", async () => {
    const path = await fakeBinary(
      "qemu-system-aarch64",
      "QEMU emulator version 8.2.2 (Debian 1:8.2.2+ds-0ubuntu1)",
    );
    expect(await findQemu({ architecture: "arm64", searchPath: `/nonexistent:${dir}` })).toMatchObject({
      path,
      version: "8.2.2",
      available: true,
    });
    expect(await findQemu({ architecture: "riscv64", searchPath: dir })).toMatchObject({
      available: false,
      unavailableReason: "qemu-system-riscv64 not found on PATH",
    });
  });

  it("reports a binary that fails or answers nonsense as unavailable", async () => {
    const broken = await fakeBinary("broken-qemu", "oops", 3);
    expect((await findQemu({ qemuPath: broken })).unavailableReason).toMatch(/broken-qemu --version: /);
    const odd = await fakeBinary("odd-qemu", "hello");
    expect(await findQemu({ qemuPath: odd })).toMatchObject({
      path: odd,
      available: false,
      unavailableReason: `${odd} --version: unrecognised output "hello"`,
    });
  });
});

describe("findCloudHypervisor", () => {
  it("reports cloud-hypervisor unavailable when it is not on the search path", async () => {
    expect(await findCloudHypervisor({ searchPath: dir })).toEqual({
      kind: "cloud-hypervisor",
      path: undefined,
      version: undefined,
      available: false,
      unavailableReason: "cloud-hypervisor not found on PATH",
    });
  });

  it("reads the version of one that is (a stand-in printing the published banner)", async () => {
    const path = await fakeBinary("cloud-hypervisor", "cloud-hypervisor v38.0.0");
    expect(await findCloudHypervisor({ searchPath: dir })).toMatchObject({
      path,
      version: "38.0.0",
      available: true,
    });
  });

  it("is one of the VMMs discoverVmms reports, after QEMU", async () => {
    const vmms = await discoverVmms({ searchPath: dir, architecture: "x64" });
    expect(vmms.map((v) => v.kind)).toEqual(["qemu", "cloud-hypervisor"]);
  });
});
