import { type ChildProcess, spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { createConnection } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { GUEST_POWEROFF, GUEST_READY, guestImage } from "./support/guest.js";

// The test guest booted straight by QEMU under TCG (no agent): the contract scripts/guest-image gives the
// VM service's tests. QEMU is part of the test environment (scripts/setup installs it).

interface Booted {
  proc: ChildProcess;
  /** Resolves with the first complete console line (after those already matched) that matches. */
  line(re: RegExp, timeoutMs: number): Promise<RegExpExecArray>;
  type(text: string): void;
  exited: Promise<number | null>;
}

let dir: string;
let booted: Booted | undefined;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "vmenv-guest-image-test-"));
});
afterEach(async () => {
  const b = booted;
  booted = undefined;
  if (b && b.proc.exitCode === null && b.proc.signalCode === null) {
    b.proc.kill("SIGKILL");
    await b.exited;
  }
  await rm(dir, { recursive: true, force: true });
});

async function boot(append: string, extra: string[] = []): Promise<Booted> {
  const { kernel, initrd } = await guestImage();
  const args = [
    ...["-accel", "tcg", "-machine", "q35", "-m", "256", "-smp", "1"],
    ...["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"],
    ...["-kernel", kernel, "-initrd", initrd, "-append", `console=ttyS0 quiet ${append}`],
    ...extra,
  ];
  const proc = spawn("qemu-system-x86_64", args, { stdio: ["pipe", "pipe", "pipe"] });
  const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
  let out = "";
  let consumed = 0; // complete lines already matched past
  const waiters = new Set<() => void>();
  proc.stdout?.setEncoding("utf8").on("data", (d: string) => {
    out += d;
    for (const w of waiters) w();
  });
  proc.stderr?.setEncoding("utf8").on("data", (d: string) => {
    out += d;
  });
  const b: Booted = {
    proc,
    exited,
    type: (text) => proc.stdin?.write(text),
    line: (re, timeoutMs) =>
      new Promise((resolveLine, reject) => {
        const check = () => {
          const lines = out.split("\n").slice(0, -1); // complete lines only
          for (let i = consumed; i < lines.length; i++) {
            const m = re.exec((lines[i] ?? "").replace(/\r$/, ""));
            if (m) {
              consumed = i + 1;
              done();
              resolveLine(m);
              return;
            }
          }
        };
        const t = setTimeout(() => {
          done();
          reject(new Error(`no console line matching ${re} after ${timeoutMs} ms; console:\n${out}`));
        }, timeoutMs);
        const onExit = (code: number | null) => {
          done();
          reject(new Error(`QEMU exited (${code}) before a line matched ${re}; console:\n${out}`));
        };
        const done = () => {
          clearTimeout(t);
          waiters.delete(check);
          proc.off("exit", onExit);
        };
        waiters.add(check);
        proc.once("exit", onExit);
        check();
      }),
  };
  booted = b;
  return b;
}

/** Sends QMP commands over the Unix socket `path`, one at a time; resolves with their replies. */
async function qmp(path: string, commands: object[]): Promise<unknown[]> {
  const sock = createConnection(path);
  sock.setEncoding("utf8");
  let buf = "";
  const pending: ((msg: Record<string, unknown>) => void)[] = [];
  sock.on("data", (d: string) => {
    buf += d;
    for (let nl = buf.indexOf("\n"); nl >= 0; nl = buf.indexOf("\n")) {
      const msg = JSON.parse(buf.slice(0, nl)) as Record<string, unknown>;
      buf = buf.slice(nl + 1);
      if (!("event" in msg)) pending.shift()?.(msg);
    }
  });
  const next = () =>
    new Promise<Record<string, unknown>>((resolveMsg, reject) => {
      pending.push(resolveMsg);
      sock.once("error", reject);
    });
  try {
    await next(); // the greeting
    const replies: unknown[] = [];
    for (const c of [{ execute: "qmp_capabilities" }, ...commands]) {
      const reply = next();
      sock.write(`${JSON.stringify(c)}\n`);
      replies.push(await reply);
    }
    return replies.slice(1);
  } finally {
    sock.destroy();
  }
}

describe("test guest image under QEMU/TCG", () => {
  it("boots to the ready line and answers on the serial console", { timeout: 240_000 }, async () => {
    await guestImage(); // a first build downloads a kernel: not part of the boot's time limit
    const started = Date.now();
    const vm = await boot("vmenv.hostname=imgtest");
    const ready = await vm.line(GUEST_READY, 60_000);
    expect(ready[1]).toBe("imgtest");
    expect(Number(ready[2])).toBeGreaterThan(0);
    expect(Date.now() - started).toBeLessThan(60_000);
    vm.type("echo $((6*7))\n");
    await vm.line(/^42$/, 20_000);
    // The shell is respawned when it exits.
    vm.type("exit\n");
    await vm.line(/built-in shell \(ash\)/, 20_000); // the new shell's banner
    vm.type("hostname; echo $((6*7+1))\n");
    await vm.line(/^imgtest$/, 20_000);
    await vm.line(/^43$/, 20_000);
  });

  it("powers off on the ACPI power button (QMP system_powerdown)", { timeout: 240_000 }, async () => {
    const sock = join(dir, "qmp.sock");
    const vm = await boot("vmenv.hostname=imgoff", ["-qmp", `unix:${sock},server=on,wait=off`]);
    await vm.line(GUEST_READY, 60_000);
    expect(await qmp(sock, [{ execute: "system_powerdown" }])).toEqual([{ return: {} }]);
    await vm.line(new RegExp(`^${GUEST_POWEROFF}$`), 30_000); // printed on a line of its own
    const code = await Promise.race([
      vm.exited,
      new Promise<string>((r) => setTimeout(() => r("still running"), 30_000)),
    ]);
    expect(code).toBe(0);
  });
});
