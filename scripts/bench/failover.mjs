#!/usr/bin/env node
// Failure detection benchmark: a real vmenv-coordinator and two real vmenv-agents (TCG), an environment
// with one RECREATE member (delay `--delay-ms`); the agent running it is SIGKILLed together with its
// QEMUs (a host that died). Prints detection time (kill → agent DOWN) and time-to-rescheduled (kill →
// member RUNNING on the other agent), once per heartbeat setting (interval/timeout in ms: the
// coordinator's defaults 1000/5000, then 200/1500), against the defaults of Incus (20 s), Nomad (20–30 s)
// and Kubernetes (50 s to NotReady + 300 s eviction). Never fails for being slow: a benchmark is not a test.
//
//   node scripts/bench/failover.mjs [--settings 1000/5000,200/1500] [--delay-ms 500] [--memory-mib 128]
import { mkdtemp } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { AgentState, MemberState, RescheduleMode } from "@vmenv/api/coordinator/v1";
import * as bench from "./lib.mjs";

const { values: opt } = parseArgs({
  options: {
    settings: { type: "string", default: "1000/5000,200/1500" },
    "delay-ms": { type: "string", default: "500" },
    "memory-mib": { type: "string", default: "128" },
  },
});
const settings = opt.settings.split(",").map((s) => s.split("/").map(Number));
const delayMs = Number(opt["delay-ms"]);
const memoryMib = Number(opt["memory-mib"]);

const { kernel, initrd } = await bench.guestImage();
const dir = await mkdtemp(join(tmpdir(), "vmenv-bench-failover-"));
const daemons = [];
const cleanup = bench.teardown(dir, daemons);

/** Polls `get` every 20 ms until `ok` holds; the time it first held (performance.now()). */
async function when(get, ok, timeoutMs, what) {
  const end = performance.now() + timeoutMs;
  while (performance.now() < end) {
    const v = await get().catch(() => undefined);
    if (v !== undefined && ok(v)) return performance.now();
    await bench.sleep(20);
  }
  throw new Error(`${what}: not after ${timeoutMs} ms`);
}

/** One pass: a coordinator with these heartbeat settings, two agents, a kill; both figures in ms. */
async function pass(i, intervalMs, timeoutMs) {
  const at = join(dir, `p${i}`);
  const { agents, c } = await bench.startFleet(at, daemons, {
    coordArgs: ["--heartbeat-interval-ms", String(intervalMs), "--heartbeat-timeout-ms", String(timeoutMs)],
  });
  await c.tree.createNode({ nodeId: "fo", node: { policy: { maxVms: 4 } } });
  const env = "environments/fo";
  await bench.coordFinished(
    c,
    await c.envs.createEnvironment({
      environmentId: "fo",
      environment: {
        node: "nodes/fo",
        members: [
          {
            id: "web-1",
            role: "web",
            spec: bench.guestVm({ id: "web-1", kernel, initrd, memoryMib }).vm.spec,
            reschedulePolicy: { mode: RescheduleMode.RECREATE, delay: durationFromMs(delayMs) },
          },
        ],
      },
      start: true,
    }),
    120_000,
  );
  const member = async () =>
    (await c.envs.getEnvironment({ name: env })).members.find((m) => m.id === "web-1");
  const from = (await member()).agent;
  const victim = agents.find((a) => `agents/${a.name}` === from);
  const other = `agents/${agents.find((a) => a !== victim).name}`;

  const t0 = performance.now();
  await bench.killMatching(`${bench.escapeRe(victim.dir)}/`); // the agent and its QEMUs: a host that died
  const down = await when(
    () => c.agents.getAgent({ name: from }),
    (a) => a.state === AgentState.DOWN,
    60_000,
    `${from} DOWN`,
  );
  const running = await when(
    member,
    (m) => m.agent === other && m.state === MemberState.RUNNING,
    120_000,
    "web-1 RUNNING on the other agent",
  );
  // This pass's processes go now (the next pass starts on fresh state); teardown removes the rest.
  await bench.killMatching(`qemu-system.*${bench.escapeRe(at)}/`);
  await bench.killMatching(`${bench.escapeRe(at)}/`);
  return { detected: down - t0, rescheduled: running - t0 };
}

const s = (ms) => `${(ms / 1000).toFixed(2)} s`;
try {
  console.log(
    `failover: agent + its QEMUs SIGKILLed, RECREATE member (delay ${delayMs} ms, ${memoryMib} MiB TCG guest); ` +
      "references: Incus 20 s, Nomad 20–30 s, Kubernetes 50 s + 300 s eviction",
  );
  for (const [i, [intervalMs, timeoutMs]] of settings.entries()) {
    const r = await pass(i, intervalMs, timeoutMs);
    console.log(
      `heartbeat ${intervalMs} ms / timeout ${timeoutMs} ms: detected DOWN after ${s(r.detected)}, ` +
        `member RUNNING on the other agent after ${s(r.rescheduled)} ` +
        `(${(20_000 / r.detected).toFixed(1)}x faster detection than Incus, ${(350_000 / r.rescheduled).toFixed(0)}x than Kubernetes' 350 s)`,
    );
  }
} finally {
  await cleanup();
}
