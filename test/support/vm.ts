import { durationFromMs } from "@bufbuild/protobuf/wkt";
import {
  DiagnosticsService,
  type Operation,
  OperationState,
  type Vm,
  VmRestartPolicy,
  VmService,
} from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { run } from "./agent.js";
import { guestImage } from "./guest.js";

export const MIB = 1024n * 1024n;

export function clients(socket: string) {
  return {
    vms: createDaemonClient(VmService, { socket, timeoutMs: 120_000 }),
    diag: createDaemonClient(DiagnosticsService, { socket, timeoutMs: 120_000 }),
  };
}

/** A CreateVm request for the test guest (direct kernel boot, serial console). */
export async function guestVm(
  id: string,
  opts: {
    vcpus?: number;
    maxVcpus?: number;
    memoryMib?: number;
    restart?: VmRestartPolicy;
    labels?: Record<string, string>;
  } = {},
) {
  const { kernel, initrd } = await guestImage();
  return {
    vmId: id,
    start: true,
    vm: {
      labels: opts.labels ?? {},
      restartPolicy: opts.restart ?? VmRestartPolicy.NEVER,
      spec: {
        vcpus: opts.vcpus ?? 1,
        maxVcpus: opts.maxVcpus ?? 0,
        memoryBytes: BigInt(opts.memoryMib ?? 192) * MIB,
        boot: {
          method: {
            case: "directKernel" as const,
            value: {
              kernelPath: kernel,
              initrdPath: initrd,
              cmdline: `console=ttyS0 quiet vmenv.hostname=${id}`,
            },
          },
        },
      },
    },
  };
}

/** Waits for an operation to end and returns it; throws when it did not succeed. */
export async function done(c: ReturnType<typeof clients>, op: Operation): Promise<Operation> {
  let cur = op;
  while (cur.state === OperationState.RUNNING || cur.state === OperationState.PENDING) {
    cur = await c.diag.waitOperation({ name: op.name, timeout: durationFromMs(60_000) });
  }
  if (cur.state !== OperationState.SUCCEEDED)
    throw new Error(`${cur.kind} ${cur.target}: ${cur.error?.message}`);
  return cur;
}

/** Polls `get` until `ok` holds, or fails after `timeoutMs` saying what it saw last. */
export async function until<T>(
  get: () => Promise<T>,
  ok: (x: T) => boolean,
  timeoutMs = 60_000,
  what = "condition",
): Promise<T> {
  const end = Date.now() + timeoutMs;
  let last: T | undefined;
  while (Date.now() < end) {
    last = await get();
    if (ok(last)) return last;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(
    `timed out waiting for ${what}; last seen: ${JSON.stringify(last, (_k, v) => (typeof v === "bigint" ? String(v) : v)).slice(0, 500)}`,
  );
}

export const isReady = (v: Vm) => v.guestReadyTime !== undefined;

/** Pids of the VMs' QEMU processes of the agent state under `dir` (not its accelerator probes). */
export async function qemusUnder(dir: string): Promise<number[]> {
  const r = await run("pgrep", [
    "-f",
    `qemu-system.*${dir.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}/state/vms/`,
  ]);
  return r.stdout.split("\n").filter(Boolean).map(Number);
}

/** Types `command` on the VM's serial console and waits for `expect` to appear in the console after it. */
export async function consoleRun(
  c: ReturnType<typeof clients>,
  name: string,
  command: string,
  expect: RegExp,
  timeoutMs = 30_000,
) {
  const ac = new AbortController();
  const t = setTimeout(() => ac.abort(), timeoutMs);
  let seen = "";
  try {
    const stream = c.vms.streamConsole(
      { name, lastLines: 1, follow: true },
      { signal: ac.signal, timeoutMs: 0 },
    );
    const reading = (async () => {
      for await (const chunk of stream) {
        seen += Buffer.from(chunk.data).toString("latin1");
        const m = expect.exec(seen);
        if (m) return m;
      }
      return undefined;
    })();
    await new Promise((r) => setTimeout(r, 300));
    await c.vms.sendConsoleInput({ name, data: new TextEncoder().encode(`${command}\n`) });
    const m = await reading.catch(() => undefined);
    if (m) return m;
  } finally {
    clearTimeout(t);
    ac.abort();
  }
  throw new Error(
    `console of ${name} did not show ${expect} after "${command}"; it showed: ${seen.slice(-500)}`,
  );
}
