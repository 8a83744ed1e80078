import { stat } from "node:fs/promises";
import { join } from "node:path";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BlockService,
  LogLevel,
  NetworkService,
  OperationState,
  type Statistics,
  VmSchema,
  VmState,
  VolumeFormat,
  WatchEventType,
} from "@vmenv/api/agent/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cliMain, type RunningAgent, run, startAgent } from "./support/agent.js";
import { clients, consoleRun, done, guestVm, isReady, MIB, qemusUnder, until } from "./support/vm.js";

/** A random /24 in 198.18.0.0/15 (the benchmarking range): no clash with the host's or other runs' nets. */
const prefix = `198.18.${Math.floor(Math.random() * 250) + 2}`;
const suffix = Math.random().toString(36).slice(2, 7);
const secs = (d: { seconds: bigint; nanos: number } | undefined) =>
  d ? Number(d.seconds) + d.nanos / 1e9 : 0;

describe("diagnostics: operations, statistics, errors, logs and /metrics of a real agent (QEMU, TCG)", () => {
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  let net: ReturnType<typeof createDaemonClient<typeof NetworkService>>;
  let metrics = "";
  const links = new Set<string>();

  beforeAll(async () => {
    agent = await startAgent(["--kvm-probe-timeout-ms", "200", "--metrics-listen", "127.0.0.1:0"]);
    c = clients(agent.socket);
    net = createDaemonClient(NetworkService, { socket: agent.socket, timeoutMs: 60_000 });
    const ready = agent
      .log()
      .split("\n")
      .find((l) => l.includes('"vmenv-agent ready"'));
    metrics = (JSON.parse(ready ?? "{}") as { metricsAddress?: string }).metricsAddress ?? "";
    const n = await net.createNetwork({ networkId: `diag-${suffix}`, network: { cidr: `${prefix}.0/24` } });
    links.add(n.bridgeName);
    const block = createDaemonClient(BlockService, { socket: agent.socket, timeoutMs: 60_000 });
    await done(
      c,
      await block.createVolume({
        volumeId: "scratch",
        volume: { store: "stores/default", format: VolumeFormat.QCOW2, sizeBytes: 32n * MIB },
      }),
    );
  });
  afterAll(async () => {
    for (const vm of ["w", "cancelled"])
      await c?.vms
        .deleteVm({ name: `vms/${vm}`, force: true, allowMissing: true })
        .then((op) => done(c, op))
        .catch(() => undefined);
    for (const p of (await net?.listPorts({ parent: `networks/diag-${suffix}` }).catch(() => undefined))
      ?.ports ?? [])
      links.add(p.tapName);
    await net?.deleteNetwork({ name: `networks/diag-${suffix}` }).catch(() => undefined);
    await agent?.stop();
    for (const l of links) await run("ip", ["link", "del", l]);
  });

  it("shows a VM create as an operation while it runs, then as SUCCEEDED with the VM as its result", async () => {
    const ac = new AbortController();
    const events: { type: WatchEventType; state: OperationState; stage: string; name: string }[] = [];
    let result: ReturnType<typeof anyUnpack> | undefined;
    const watching = (async () => {
      for await (const e of c.diag.watchOperations(
        { target: "vms/w" },
        { signal: ac.signal, timeoutMs: 0 },
      )) {
        const op = e.operation;
        if (!op) continue;
        events.push({ type: e.type, state: op.state, stage: op.progress?.stage ?? "", name: op.name });
        if (op.state === OperationState.SUCCEEDED && op.result) {
          result = anyUnpack(op.result, VmSchema);
          return;
        }
      }
    })();
    await new Promise((r) => setTimeout(r, 200));
    const req = await guestVm("w", { memoryMib: 192 });
    const spec = req.vm.spec as { disks?: unknown[]; nics?: unknown[] };
    spec.disks = [{ id: "scratch", volume: "volumes/scratch" }];
    spec.nics = [{ id: "eth0", network: `networks/diag-${suffix}` }];
    const op = await c.vms.createVm(req);
    expect(op.state).toBe(OperationState.RUNNING);
    // While it runs, it is listed among the running operations of its target.
    const listed = await c.diag.listOperations({ target: "vms/w" });
    expect(listed.operations.map((o) => o.name)).toContain(op.name);
    await watching;
    ac.abort();
    const mine = events.filter((e) => e.name === op.name);
    expect(mine[0]).toMatchObject({ type: WatchEventType.CREATED, state: OperationState.RUNNING });
    expect(mine.some((e) => e.state === OperationState.RUNNING && e.stage === "starting the VMM")).toBe(true);
    expect(mine.at(-1)?.state).toBe(OperationState.SUCCEEDED);
    expect((result as { name?: string; state?: VmState } | undefined)?.name).toBe("vms/w");
    expect((result as { state?: VmState }).state).toBe(VmState.RUNNING);
    const vm = await until(() => c.vms.getVm({ name: "vms/w" }), isReady, 120_000, "w ready");
    for (const p of (await net.listPorts({ parent: `networks/diag-${suffix}` })).ports) links.add(p.tapName);
    expect(vm.spec?.nics[0]?.ipAddress).toMatch(/^198\.18\./);
  });

  it("a cancelled create leaves nothing behind: no QEMU, no VM folder, CANCELLED; StreamLogs follows it by target", async () => {
    const ac = new AbortController();
    const lines: { message: string; target: string; operation: string }[] = [];
    const following = (async () => {
      for await (const e of c.diag.streamLogs(
        { target: "vms/cancelled", follow: true, minLevel: LogLevel.INFO },
        { signal: ac.signal, timeoutMs: 0 },
      )) {
        lines.push({ message: e.message, target: e.target, operation: e.operation });
        if (e.message === "operation cancelled") return;
      }
    })().catch((e: unknown) => {
      if (!ac.signal.aborted) throw e;
    });
    await new Promise((r) => setTimeout(r, 200));
    const op = await c.vms.createVm(await guestVm("cancelled", { memoryMib: 128 }));
    await c.diag.cancelOperation({ name: op.name });
    const end = await done(c, op).catch(() => c.diag.getOperation({ name: op.name }));
    expect(OperationState[end.state]).toBe("CANCELLED");
    expect(end.error?.code).toBe(Code.Canceled);
    await expect(c.vms.getVm({ name: "vms/cancelled" })).rejects.toMatchObject({ code: Code.NotFound });
    expect((await qemusUnder(agent.dir)).length).toBe(1); // w's only
    const r = await run("pgrep", ["-f", "process=vmenv-cancelled"]);
    expect(r.stdout.trim()).toBe("");
    await expect(stat(join(agent.dir, "state/vms/cancelled"))).rejects.toMatchObject({ code: "ENOENT" });
    await Promise.race([following, new Promise((r) => setTimeout(r, 10_000))]);
    ac.abort();
    expect(lines.map((l) => l.message)).toEqual(
      expect.arrayContaining(["operation started", "operation cancelled"]),
    );
    expect(lines.every((l) => l.target === "vms/cancelled")).toBe(true);
    expect(lines.find((l) => l.message === "operation started")?.operation).toBe(op.name);
  });

  it("statistics of the running guest move when it works: vCPU time, disk writes and reads, NIC packets; /metrics shows them", async () => {
    const sample = async () => {
      const s = await c.diag.getStatistics({ vms: ["vms/w"] });
      const v = s.vms[0];
      if (!v) throw new Error("no statistics for vms/w");
      return { s, v };
    };
    const s0 = await sample();
    expect(s0.s.host?.memory?.totalBytes).toBeGreaterThan(0n);
    expect(s0.s.host?.runningVms).toBe(1);
    expect(s0.v.vcpus).toHaveLength(1);
    expect(s0.v.memoryBytes).toBe(192n * MIB);
    expect(s0.v.memoryRssBytes).toBeGreaterThan(16n * MIB);
    expect(s0.v.balloon).toBeUndefined(); // no balloon device
    expect(s0.v.disks.map((d) => [d.deviceId, d.volume])).toEqual([["scratch", "volumes/scratch"]]);
    expect(s0.v.nics[0]?.tapName).toMatch(/^vmt-/);

    // Idle for 2 s, then busy for 3 s: the vCPU's time grows much faster while the guest loops.
    const t0 = Date.now();
    await new Promise((r) => setTimeout(r, 2000));
    const s1 = await sample();
    const idleRate =
      (secs(s1.v.vcpus[0]?.cpuTime) - secs(s0.v.vcpus[0]?.cpuTime)) / ((Date.now() - t0) / 1000);
    const t1 = Date.now();
    await consoleRun(
      c,
      "vms/w",
      "e=$(($(date +%s)+3)); while [ $(date +%s) -lt $e ]; do :; done; echo BUSY-$((6*7))",
      /BUSY-42/,
    );
    const s2 = await sample();
    const busyRate =
      (secs(s2.v.vcpus[0]?.cpuTime) - secs(s1.v.vcpus[0]?.cpuTime)) / ((Date.now() - t1) / 1000);
    expect(busyRate).toBeGreaterThan(0.3);
    expect(busyRate).toBeGreaterThan(idleRate * 1.5);
    expect(secs(s2.v.cpuTime)).toBeGreaterThan(secs(s1.v.cpuTime));

    // 4 MiB written to the disk, 1 MiB read from a part not written (so not in the guest's cache).
    await consoleRun(
      c,
      "vms/w",
      "dd if=/dev/zero of=/dev/vda bs=65536 count=64 conv=fsync 2>/dev/null; dd if=/dev/vda of=/dev/null bs=65536 skip=200 count=16 2>/dev/null; echo DD-$((6*7))",
      /DD-42/,
    );
    const s3 = await sample();
    const d2 = s2.v.disks[0];
    const d3 = s3.v.disks[0];
    expect(Number((d3?.writeBytes ?? 0n) - (d2?.writeBytes ?? 0n))).toBeGreaterThanOrEqual(4 * 1024 * 1024);
    expect(Number((d3?.readBytes ?? 0n) - (d2?.readBytes ?? 0n))).toBeGreaterThanOrEqual(1024 * 1024);
    expect((d3?.writeOps ?? 0n) > (d2?.writeOps ?? 0n)).toBe(true);

    // Five pings of the gateway: five packets out of the guest and five answers into it, at least.
    await consoleRun(
      c,
      "vms/w",
      `ping -c 5 -i 0.2 -W 2 ${prefix}.1 >/dev/null 2>&1 && echo PING-OK-$((6*7)) || echo PING-NO-$((6*7))`,
      /PING-(OK|NO)-42/,
    );
    const s4 = await sample();
    const n3 = s3.v.nics[0];
    const n4 = s4.v.nics[0];
    expect(Number((n4?.txPackets ?? 0n) - (n3?.txPackets ?? 0n))).toBeGreaterThanOrEqual(5);
    expect(Number((n4?.rxPackets ?? 0n) - (n3?.rxPackets ?? 0n))).toBeGreaterThanOrEqual(5);
    expect(Number((n4?.txBytes ?? 0n) - (n3?.txBytes ?? 0n))).toBeGreaterThanOrEqual(5 * 98);

    // The stream: two samples a second apart, each with the VM.
    const got: Statistics[] = [];
    const ac = new AbortController();
    for await (const s of c.diag.watchStatistics(
      { vms: ["vms/w"], interval: { seconds: 1n, nanos: 0 } },
      { signal: ac.signal, timeoutMs: 0 },
    )) {
      got.push(s);
      if (got.length === 2) break;
    }
    ac.abort();
    expect(got.map((s) => s.vms.map((v) => v.vm))).toEqual([["vms/w"], ["vms/w"]]);
    const gap = Number(got[1]?.sampleTime?.seconds ?? 0n) - Number(got[0]?.sampleTime?.seconds ?? 0n);
    expect(gap).toBeGreaterThanOrEqual(0);
    expect(gap).toBeLessThanOrEqual(3);

    // Prometheus: the same numbers, as text.
    expect(metrics).toMatch(/^127\.0\.0\.1:\d+$/);
    const res = await fetch(`http://${metrics}/metrics`);
    expect(res.status).toBe(200);
    const text = await res.text();
    const value = (re: RegExp) => Number(re.exec(text)?.[1] ?? Number.NaN);
    expect(value(/^vmenv_vm_vcpu_seconds_total\{vm="vms\/w",vcpu="0"\} ([\d.e+]+)$/m)).toBeGreaterThanOrEqual(
      secs(s2.v.vcpus[0]?.cpuTime),
    );
    expect(
      value(/^vmenv_vm_disk_written_bytes_total\{vm="vms\/w",disk="scratch"\} ([\d.e+]+)$/m),
    ).toBeGreaterThanOrEqual(Number(d3?.writeBytes ?? 0n));
    expect(
      value(/^vmenv_vm_nic_transmit_packets_total\{vm="vms\/w",nic="eth0"\} ([\d.e+]+)$/m),
    ).toBeGreaterThanOrEqual(Number(n4?.txPackets ?? 0n));
    expect(text).toMatch(/^vmenv_host_running_vms 1$/m);
    expect(text).toMatch(/^vmenv_agent_process_resident_memory_bytes \d+/m);
    expect((await fetch(`http://${metrics}/other`)).status).toBe(404);
  });

  it("records a failed create in ListErrors with its reason and operation id, and `vmenv errors` prints it", async () => {
    const req = await guestVm("f");
    (req.vm.spec as { nics?: unknown[] }).nics = [{ id: "eth0", network: "networks/nope" }];
    const op = await c.vms.createVm(req);
    const end = await done(c, op).catch(() => c.diag.getOperation({ name: op.name }));
    expect(OperationState[end.state]).toBe("FAILED");
    const { errors } = await c.diag.listErrors({ target: "vms/f" });
    expect(errors).toHaveLength(1);
    expect(errors[0]).toMatchObject({ reason: "NETWORK_NOT_FOUND", operation: op.name, target: "vms/f" });
    expect(errors[0]?.message).toMatch(/networks\/nope/);
    expect(errors[0]?.status?.code).toBe(Code.NotFound);
    expect((await c.diag.listErrors({ operation: op.name })).errors.map((e) => e.id)).toEqual([
      errors[0]?.id,
    ]);
    // Nothing of it is left: the VM does not exist.
    await expect(c.vms.getVm({ name: "vms/f" })).rejects.toBeInstanceOf(ConnectError);
    const cli = await run(process.execPath, [
      cliMain,
      "--socket",
      agent.socket,
      "errors",
      "--target",
      "vms/f",
    ]);
    expect(cli.code, cli.stderr).toBe(0);
    expect(cli.stdout).toMatch(
      /NETWORK_NOT_FOUND\s+vms\/f\s+\S+\s+vm\.create of vms\/f failed: .*networks\/nope/,
    );
    const ops = await run(process.execPath, [
      cliMain,
      "--socket",
      agent.socket,
      "ops",
      "list",
      "--target",
      "vms/f",
    ]);
    expect(ops.stdout).toMatch(/vm\.create\s+vms\/f\s+failed/);
  });
});
