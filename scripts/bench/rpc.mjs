#!/usr/bin/env node
// RPC benchmark: unary latency (p50/p99 at concurrency 1) and throughput (concurrency 64) of
// HostService/GetHostInfo on a real vmenv-agent, next to the echo server on the same RPC stack (the
// floor), over the Unix socket and over TCP (h2c). Prints the ratios agent / echo. Never fails for
// being slow: a benchmark is not a test.
//
//   node scripts/bench/rpc.mjs [--seconds 3] [--latency-calls 3000] [--rounds 3]
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { HostService } from "@vmenv/api/agent/v1";
import { EchoService } from "@vmenv/api/testing/v1";
import { createDaemonClient } from "@vmenv/rpc";

const { values: opt } = parseArgs({
  options: {
    seconds: { type: "string", default: "3" },
    "latency-calls": { type: "string", default: "3000" },
    rounds: { type: "string", default: "3" },
  },
});
const seconds = Number(opt.seconds);
const latencyCalls = Number(opt["latency-calls"]);
const rounds = Number(opt.rounds);
const root = resolve(import.meta.dirname, "../..");

/** Starts a server process and resolves with its TCP address once its ready line appears. */
function start(name, args, readyMsg) {
  const proc = spawn(process.execPath, args, { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  proc.stderr.setEncoding("utf8");
  const ready = new Promise((res, rej) => {
    proc.stderr.on("data", (d) => {
      err += d;
      for (const line of err.split("\n")) {
        if (line.includes(`"msg":"${readyMsg}"`)) res(JSON.parse(line).tcpAddress);
      }
      if (err.length > 1e6) err = err.slice(-1e5); // the per-call log lines are not kept
    });
    proc.once("exit", (c) => rej(new Error(`${name} exited (${c}): ${err}`)));
  });
  return { proc, ready };
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function latency(call) {
  const d = new Float64Array(latencyCalls);
  for (let i = 0; i < latencyCalls; i++) {
    const t = performance.now();
    await call();
    d[i] = performance.now() - t;
  }
  d.sort();
  return { p50: percentile(d, 50) * 1000, p99: percentile(d, 99) * 1000 };
}

async function throughput(call, concurrency) {
  let n = 0;
  const end = performance.now() + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < end) {
        await call();
        n++;
      }
    }),
  );
  return n / seconds;
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const dir = await mkdtemp(join(tmpdir(), "vmenv-bench-"));
const agent = start(
  "vmenv-agent",
  [
    join(root, "packages/agent/dist/main.js"),
    "--state-dir",
    join(dir, "agent"),
    "--socket",
    join(dir, "agent.sock"),
    "--listen",
    "127.0.0.1:0",
    "--accelerator",
    "tcg",
  ],
  "vmenv-agent ready",
);
const echo = start(
  "echo-server",
  [join(root, "scripts/bench/echo-server.mjs"), join(dir, "echo.sock"), "127.0.0.1:0"],
  "echo-server ready",
);
try {
  const [agentTcp, echoTcp] = await Promise.all([agent.ready, echo.ready]);
  const targets = {
    unix: { agent: { socket: join(dir, "agent.sock") }, echo: { socket: join(dir, "echo.sock") } },
    tcp: { agent: { address: agentTcp }, echo: { address: echoTcp } },
  };
  const rows = [];
  for (const [transport, t] of Object.entries(targets)) {
    const host = createDaemonClient(HostService, { ...t.agent, retry: false });
    const ech = createDaemonClient(EchoService, { ...t.echo, retry: false });
    const calls = { agent: () => host.getHostInfo({}), echo: () => ech.echo({ message: "" }) };
    // Warm up (JIT, connections; the agent's first GetHostInfo also waits for its accelerator probes).
    for (const c of Object.values(calls)) for (let i = 0; i < 500; i++) await c();
    const r = { agent: { p50: [], p99: [], c1: [], c64: [] }, echo: { p50: [], p99: [], c1: [], c64: [] } };
    // Rounds alternate between the two servers so that drift in the machine hits both alike.
    for (let round = 0; round < rounds; round++) {
      for (const which of ["echo", "agent"]) {
        const l = await latency(calls[which]);
        r[which].p50.push(l.p50);
        r[which].p99.push(l.p99);
        r[which].c1.push(await throughput(calls[which], 1));
        r[which].c64.push(await throughput(calls[which], 64));
      }
    }
    for (const which of ["echo", "agent"]) {
      rows.push({
        transport,
        server: which === "agent" ? "HostService.GetHostInfo" : "EchoService.Echo (floor)",
        p50: median(r[which].p50),
        p99: median(r[which].p99),
        c1: median(r[which].c1),
        c64: median(r[which].c64),
      });
    }
  }
  const fmt = (x, d = 0) => x.toFixed(d).padStart(8);
  console.log(
    `\nRPC benchmark: median of ${rounds} rounds; latency over ${latencyCalls} sequential calls, throughput over ${seconds}s`,
  );
  console.log(`node ${process.version}, ${(await import("node:os")).cpus().length} CPUs\n`);
  console.log("transport  server                      p50 µs   p99 µs   c=1 /s  c=64 /s");
  for (const x of rows) {
    console.log(
      `${x.transport.padEnd(10)} ${x.server.padEnd(26)} ${fmt(x.p50)} ${fmt(x.p99)} ${fmt(x.c1)} ${fmt(x.c64)}`,
    );
  }
  console.log("\nratio agent / echo (cost; target ≤ 1.20):");
  for (const transport of Object.keys(targets)) {
    const [e, a] = rows.filter((x) => x.transport === transport);
    console.log(
      `${transport.padEnd(10)} p50 ${(a.p50 / e.p50).toFixed(2)}×  p99 ${(a.p99 / e.p99).toFixed(2)}×  ` +
        `time per call at c=1 ${(e.c1 / a.c1).toFixed(2)}×  at c=64 ${(e.c64 / a.c64).toFixed(2)}×`,
    );
  }
} finally {
  for (const p of [agent.proc, echo.proc]) p.kill("SIGTERM");
  await Promise.all(
    [agent.proc, echo.proc].map((p) => new Promise((r) => (p.exitCode !== null ? r() : p.once("exit", r)))),
  );
  await rm(dir, { recursive: true, force: true });
}
