import { existsSync } from "node:fs";
import { join } from "node:path";
import { toJson } from "@bufbuild/protobuf";
import { ValueSchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { OperationState, VmmKind, VmRestartPolicy, VmState, WatchEventType } from "@vmenv/api/agent/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { type RunningAgent, startAgent } from "./support/agent.js";
import { clients, consoleRun, done, guestVm, isReady, qemusUnder, until } from "./support/vm.js";

const err = (p: Promise<unknown>) =>
  p.then(
    () => {
      throw new Error("expected the call to fail");
    },
    (e) => ConnectError.from(e),
  );

describe("VmService on real QEMU (TCG)", () => {
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  beforeEach(async () => {
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    c = clients(agent.socket);
  });
  afterEach(async () => {
    await agent?.stop(); // kills the VMs it leaves, even when the test failed
  });

  it("runs a VM through its whole life and leaves nothing behind", async () => {
    const created = await done(c, await c.vms.createVm(await guestVm("life")));
    expect(created.target).toBe("vms/life");
    let vm = await until(() => c.vms.getVm({ name: "vms/life" }), isReady, 90_000, "guest ready");
    expect(vm.state).toBe(VmState.RUNNING);
    const pid = vm.pid;
    expect(await qemusUnder(agent.dir)).toEqual([pid]);
    expect((await consoleRun(c, "vms/life", "echo $((6*7))", /\b42\b/))[0]).toBe("42");

    // The debugging passthrough reaches QEMU's own monitor.
    const qmp = await c.vms.executeQmpCommand({ name: "vms/life", command: "query-status" });
    expect(qmp.returnValue && toJson(ValueSchema, qmp.returnValue)).toMatchObject({
      running: true,
      status: "running",
    });
    // Labels and restart policy change in place; a stale etag is refused.
    const labelled = await c.vms.updateVm({
      vm: { name: "vms/life", labels: { tier: "web" }, etag: vm.etag },
      updateMask: { paths: ["labels"] },
    });
    expect(labelled.labels).toEqual({ tier: "web" });
    const stale = await err(
      c.vms.updateVm({
        vm: { name: "vms/life", labels: {}, etag: vm.etag },
        updateMask: { paths: ["labels"] },
      }),
    );
    expect(stale.code).toBe(Code.Aborted);

    expect((await c.vms.pauseVm({ name: "vms/life" })).state).toBe(VmState.PAUSED);
    expect((await c.vms.pauseVm({ name: "vms/life" })).state).toBe(VmState.PAUSED); // NOOP
    expect((await c.vms.resumeVm({ name: "vms/life" })).state).toBe(VmState.RUNNING);

    // A forced reboot resets the guest in the same process: it boots again and says so.
    await done(c, await c.vms.rebootVm({ name: "vms/life", force: true }));
    vm = await until(() => c.vms.getVm({ name: "vms/life" }), isReady, 90_000, "guest ready after reset");
    expect(vm.pid).toBe(pid);

    // Graceful stop: the guest gets the ACPI power button and powers off by itself.
    await done(c, await c.vms.stopVm({ name: "vms/life" }));
    vm = await c.vms.getVm({ name: "vms/life" });
    expect(vm.state).toBe(VmState.STOPPED);
    expect(vm.pid).toBe(0);
    expect(await qemusUnder(agent.dir)).toEqual([]);
    // Stopping a stopped VM changes nothing and is no error.
    const again = await c.vms.stopVm({ name: "vms/life" });
    expect(again.state).toBe(OperationState.SUCCEEDED);

    await done(c, await c.vms.startVm({ name: "vms/life" }));
    vm = await until(() => c.vms.getVm({ name: "vms/life" }), isReady, 90_000, "guest ready after start");
    expect(vm.pid).not.toBe(pid);

    // Deleting a running VM needs force; then nothing of it remains.
    const e = await err(c.vms.deleteVm({ name: "vms/life" }));
    expect(e.code).toBe(Code.FailedPrecondition);
    expect(e.findDetails(ErrorInfoSchema)[0]?.reason).toBe("VM_RUNNING");
    await done(c, await c.vms.deleteVm({ name: "vms/life", force: true }));
    expect((await err(c.vms.getVm({ name: "vms/life" }))).code).toBe(Code.NotFound);
    expect(await qemusUnder(agent.dir)).toEqual([]);
    expect(existsSync(join(agent.dir, "state/vms/life"))).toBe(false);
  });

  it("creates once: the same id and spec again is the same VM, another spec is ALREADY_EXISTS", async () => {
    const req = await guestVm("twice");
    const [a, b] = await Promise.all([c.vms.createVm(req), c.vms.createVm(req)]);
    await done(c, a);
    await done(c, b);
    await until(
      () => c.vms.getVm({ name: "vms/twice" }),
      (v) => v.state === VmState.RUNNING,
      30_000,
    );
    expect((await c.vms.listVms({})).vms.map((v) => v.name)).toEqual(["vms/twice"]);
    expect(await qemusUnder(agent.dir)).toHaveLength(1);
    const other = await guestVm("twice", { memoryMib: 256 });
    const e = await err(c.vms.createVm(other));
    expect(e.code).toBe(Code.AlreadyExists);
    expect(e.findDetails(ErrorInfoSchema)[0]).toMatchObject({
      reason: "VM_ALREADY_EXISTS",
      metadata: { vm: "vms/twice" },
    });
  });

  it("refuses bad input with a clear error and leaves nothing behind", async () => {
    const cases: [string, Awaited<ReturnType<typeof guestVm>>, Code, RegExp][] = [];
    const absurdMem = await guestVm("big");
    absurdMem.vm.spec.memoryBytes = 1n << 50n; // 1 PiB
    cases.push(["absurd memory", absurdMem, Code.InvalidArgument, /memory_bytes: .*more than this host has/]);
    const absurdCpu = await guestVm("cpus", { vcpus: 4096 });
    cases.push([
      "absurd vCPUs",
      absurdCpu,
      Code.InvalidArgument,
      /vcpus: must be between 1 and 255, got 4096/,
    ]);
    const noKernel = await guestVm("nokernel");
    if (noKernel.vm.spec.boot.method.case === "directKernel")
      noKernel.vm.spec.boot.method.value.kernelPath = "/nonexistent/vmlinuz";
    cases.push([
      "missing kernel",
      noKernel,
      Code.InvalidArgument,
      /kernel_path: \/nonexistent\/vmlinuz: no such readable file/,
    ]);
    cases.push([
      "id with ../",
      { ...(await guestVm("x")), vmId: "../etc" },
      Code.InvalidArgument,
      /not a valid VM id/,
    ]);
    cases.push([
      "id with shell characters",
      { ...(await guestVm("x")), vmId: "a;rm -rf $HOME" },
      Code.InvalidArgument,
      /not a valid VM id/,
    ]);
    const ch = await guestVm("ch");
    (ch.vm.spec as { vmm?: VmmKind }).vmm = VmmKind.CLOUD_HYPERVISOR;
    cases.push([
      "unavailable driver",
      ch,
      Code.FailedPrecondition,
      /cloud-hypervisor VMM is not available on this host/,
    ]);
    for (const [what, req, code, message] of cases) {
      const e = await err(c.vms.createVm(req));
      expect.soft(e.code, what).toBe(code);
      expect.soft(e.rawMessage, what).toMatch(message);
    }
    expect((await c.vms.listVms({})).vms).toEqual([]);
    expect(await qemusUnder(agent.dir)).toEqual([]);
    expect(
      existsSync(join(agent.dir, "state/vms"))
        ? (await import("node:fs")).readdirSync(join(agent.dir, "state/vms"))
        : [],
    ).toEqual([]);
  });

  it("reports a VMM killed from outside as crashed within a second, and restarts it when its policy says so", async () => {
    await done(c, await c.vms.createVm(await guestVm("fragile", { restart: VmRestartPolicy.NEVER })));
    await done(c, await c.vms.createVm(await guestVm("phoenix", { restart: VmRestartPolicy.ON_CRASH })));
    const fragile = await c.vms.getVm({ name: "vms/fragile" });
    const phoenix = await c.vms.getVm({ name: "vms/phoenix" });

    const ac = new AbortController();
    const seen: { name: string; state: VmState; at: number }[] = [];
    const watching = (async () => {
      try {
        for await (const ev of c.vms.watchVms({}, { signal: ac.signal, timeoutMs: 0 })) {
          if (ev.type === WatchEventType.UPDATED && ev.vm)
            seen.push({ name: ev.vm.name, state: ev.vm.state, at: Date.now() });
        }
      } catch {
        // cancelled at the end of the test
      }
    })();
    await new Promise((r) => setTimeout(r, 300));
    const killedAt = Date.now();
    process.kill(fragile.pid, "SIGKILL");
    process.kill(phoenix.pid, "SIGKILL");
    const firstCrash = async () =>
      ["vms/fragile", "vms/phoenix"].map((n) =>
        seen.find((s) => s.name === n && s.state === VmState.CRASHED),
      );
    const crashed = await until(
      firstCrash,
      (x) => x.every((e) => e !== undefined),
      5000,
      "a crash event for each VM",
    );
    for (const cr of crashed) expect((cr?.at ?? Number.POSITIVE_INFINITY) - killedAt).toBeLessThan(1000);
    const back = await until(
      () => c.vms.getVm({ name: "vms/phoenix" }),
      (v) => v.state === VmState.RUNNING && v.pid !== phoenix.pid,
      30_000,
    );
    expect(back.restartCount).toBe(1);
    expect((await c.vms.getVm({ name: "vms/fragile" })).state).toBe(VmState.CRASHED);
    ac.abort();
    await watching;
  });
});

describe("agent restarts do not lose VMs", () => {
  it("re-adopts three running VMs after SIGKILL, cleans a create cut short, and orphans no QEMU", async () => {
    let agent = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    try {
      let c = clients(agent.socket);
      for (const id of ["a1", "a2", "a3"]) await done(c, await c.vms.createVm(await guestVm(id)));
      const before = (await c.vms.listVms({})).vms;
      expect(before.map((v) => v.state)).toEqual([VmState.RUNNING, VmState.RUNNING, VmState.RUNNING]);
      // A fourth create, cut short by the kill.
      void c.vms.createVm(await guestVm("a4")).catch(() => undefined);
      await new Promise((r) => setTimeout(r, 150));
      await agent.kill();
      // The VMs did not notice.
      for (const v of before) expect(() => process.kill(v.pid, 0)).not.toThrow();

      agent = await startAgent(["--kvm-probe-timeout-ms", "200"], {}, { dir: agent.dir });
      c = clients(agent.socket);
      const after = (await c.vms.listVms({})).vms;
      const byName = new Map(after.map((v) => [v.name, v]));
      for (const v of before) {
        expect(byName.get(v.name)?.state).toBe(VmState.RUNNING);
        expect(byName.get(v.name)?.pid).toBe(v.pid);
      }
      // a4 was either completed (and runs) or cleaned away; no QEMU runs that the agent does not list.
      const a4 = byName.get("vms/a4");
      if (a4) expect(a4.state).toBe(VmState.RUNNING);
      const listed = after
        .filter((v) => v.pid)
        .map((v) => v.pid)
        .sort();
      expect((await qemusUnder(agent.dir)).sort()).toEqual(listed);
      // The re-adopted VMs are fully driven: console and stop work.
      expect((await consoleRun(c, "vms/a1", "echo adopted-$((1+1))", /adopted-2/))[0]).toBe("adopted-2");
      await done(c, await c.vms.stopVm({ name: "vms/a2", force: true }));
      expect((await c.vms.getVm({ name: "vms/a2" })).state).toBe(VmState.STOPPED);
    } finally {
      await agent.stop();
    }
  });
});
