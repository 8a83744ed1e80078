import { Code } from "@connectrpc/connect";
import {
  BlockService,
  DeviceChangeAction,
  DeviceChangeOutcome,
  VmDeviceState,
  VolumeFormat,
} from "@vmenv/api/agent/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, startAgent } from "./support/agent.js";
import { clients, consoleRun, done, guestVm, isReady, MIB, until } from "./support/vm.js";

const disk = (id: string, volume: string, readOnly = false) => ({
  case: "disk" as const,
  value: { id, volume, readOnly, serial: `sn-${id}` },
});
const change = (
  action: DeviceChangeAction,
  device: ReturnType<typeof disk> | { case: "deviceId"; value: string },
) => ({ action, device });

describe("device change sets: volumes hot-plugged into running VMs (real QEMU, TCG)", () => {
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  let block: ReturnType<typeof createDaemonClient<typeof BlockService>>;
  beforeAll(async () => {
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    c = clients(agent.socket);
    block = createDaemonClient(BlockService, { socket: agent.socket, timeoutMs: 60_000 });
    const op = await block.createVolume({
      volumeId: "data",
      volume: { store: "stores/default", format: VolumeFormat.QCOW2, sizeBytes: 64n * MIB },
    });
    await done(c, op);
  });
  afterAll(async () => {
    await agent?.stop();
  });

  it("binds a volume into a running VM, the guest writes it, unbinds it, and a second VM reads the data", async () => {
    await done(c, await c.vms.createVm(await guestVm("first")));
    await until(() => c.vms.getVm({ name: "vms/first" }), isReady, 90_000, "guest ready");
    const set = [change(DeviceChangeAction.BIND, disk("data", "volumes/data"))];

    const applied = await c.vms.commitVmDeviceChanges({ name: "vms/first", changes: set });
    expect(applied.results.map((r) => r.outcome)).toEqual([DeviceChangeOutcome.APPLIED]);
    expect(applied.vm?.devices).toMatchObject([{ id: "data", state: VmDeviceState.BOUND }]);
    // The same set again changes nothing.
    const again = await c.vms.commitVmDeviceChanges({ name: "vms/first", changes: set });
    expect(again.results.map((r) => r.outcome)).toEqual([DeviceChangeOutcome.NOOP]);

    // The guest sees the disk and writes to it.
    await consoleRun(
      c,
      "vms/first",
      "until [ -b /dev/vda ]; do sleep 0.2; done; echo seen-$((1+1))",
      /seen-2/,
      30_000,
    );
    await consoleRun(
      c,
      "vms/first",
      "echo vmenv-data-42 | dd of=/dev/vda bs=512 conv=sync 2>/dev/null; sync; echo wrote-$((2+1))",
      /wrote-3/,
    );

    // In use: the volume cannot be deleted, and the error names the VM.
    const inUse = await block.deleteVolume({ name: "volumes/data" }).then(
      () => undefined,
      (e) => e,
    );
    expect(inUse?.code).toBe(Code.FailedPrecondition);
    expect(inUse?.findDetails(ErrorInfoSchema)[0]?.metadata.vm).toBe("vms/first");
    expect((await block.listVolumes({ usedBy: "vms/first" })).volumes.map((v) => v.name)).toEqual([
      "volumes/data",
    ]);

    // Unbind (hot-unplug: the guest releases it), then leave.
    const off = await c.vms.commitVmDeviceChanges({
      name: "vms/first",
      changes: [
        change(DeviceChangeAction.UNBIND, { case: "deviceId", value: "data" }),
        change(DeviceChangeAction.LEAVE, { case: "deviceId", value: "data" }),
      ],
    });
    expect(off.results.map((r) => r.outcome)).toEqual([
      DeviceChangeOutcome.APPLIED,
      DeviceChangeOutcome.APPLIED,
    ]);
    await consoleRun(
      c,
      "vms/first",
      "while [ -b /dev/vda ]; do sleep 0.2; done; echo gone-$((3+1))",
      /gone-4/,
      30_000,
    );

    // A second VM gets the volume at create time and reads what the first wrote.
    const second = await guestVm("second");
    (second.vm.spec as { disks?: unknown[] }).disks = [
      { id: "data", volume: "volumes/data", readOnly: true },
    ];
    await done(c, await c.vms.createVm(second));
    await until(() => c.vms.getVm({ name: "vms/second" }), isReady, 90_000, "second guest ready");
    const read = await consoleRun(c, "vms/second", "head -c 14 /dev/vda | tr a-z A-Z; echo", /VMENV-DATA-42/);
    expect(read[0]).toBe("VMENV-DATA-42");
  });

  it("reports each element on its own: a missing volume is an ERROR and leaves no half-attached device", async () => {
    await block
      .createVolume({ volumeId: "extra", volume: { store: "stores/default", sizeBytes: 32n * MIB } })
      .then((op) => done(c, op));
    await done(c, await c.vms.createVm(await guestVm("third")));
    await until(
      () => c.vms.getVm({ name: "vms/third" }),
      (v) => v.state === 4,
      30_000,
    );
    const r = await c.vms.commitVmDeviceChanges({
      name: "vms/third",
      changes: [
        change(DeviceChangeAction.BIND, disk("ghost", "volumes/nope")),
        change(DeviceChangeAction.BIND, disk("extra", "volumes/extra")),
        change(DeviceChangeAction.UNBIND, { case: "deviceId", value: "never-was" }),
      ],
    });
    expect(r.results.map((x) => x.outcome)).toEqual([
      DeviceChangeOutcome.ERROR,
      DeviceChangeOutcome.APPLIED,
      DeviceChangeOutcome.ERROR,
    ]);
    expect(r.results[0]?.error?.code).toBe(Code.NotFound);
    expect(r.results[0]?.error?.message).toMatch(/volumes\/nope/);
    expect(r.vm?.devices.map((d) => d.id)).toEqual(["extra"]);
    const qmp = await c.vms.executeQmpCommand({ name: "vms/third", command: "query-block" });
    const nodes = JSON.stringify(qmp.returnValue);
    expect(nodes).toContain("d-extra");
    expect(nodes).not.toContain("ghost");
  });
});
