import { Code } from "@connectrpc/connect";
import {
  BlockService,
  DeviceChangeAction,
  DeviceChangeOutcome,
  VmDeviceState,
  VolumeBackend,
  VolumeFormat,
} from "@vmenv/api/agent/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, startAgent } from "./support/agent.js";
import { daemonsUnder } from "./support/storage-daemons.js";
import { clients, consoleRun, done, guestVm, isReady, MIB, until } from "./support/vm.js";

const disk = (id: string, volume: string, readOnly = false) => ({
  case: "disk" as const,
  value: { id, volume, readOnly, serial: `sn-${id}` },
});
const byId = (id: string) => ({ case: "deviceId" as const, value: id });

describe("volumes served by qemu-storage-daemon (vhost-user-blk, NBD) to real QEMU guests (TCG)", () => {
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  let block: ReturnType<typeof createDaemonClient<typeof BlockService>>;
  const volume = async (id: string, backend: VolumeBackend, sizeMib = 64n) =>
    done(
      c,
      await block.createVolume({
        volumeId: id,
        volume: { store: "stores/default", format: VolumeFormat.QCOW2, sizeBytes: sizeMib * MIB, backend },
      }),
    );
  const vm = async (id: string, disks: { id: string; volume: string; readOnly: boolean }[] = []) => {
    const req = await guestVm(id);
    (req.vm.spec as { disks?: unknown[] }).disks = disks;
    await done(c, await c.vms.createVm(req));
    return until(() => c.vms.getVm({ name: `vms/${id}` }), isReady, 90_000, `${id} ready`);
  };
  const deleteVm = async (id: string) =>
    done(c, await c.vms.deleteVm({ name: `vms/${id}`, force: true, allowMissing: true }));

  beforeAll(async () => {
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    c = clients(agent.socket);
    block = createDaemonClient(BlockService, { socket: agent.socket, timeoutMs: 60_000 });
  });
  afterAll(async () => {
    await agent?.stop(); // also kills every process (QEMU, storage daemons) under its directory
    expect(await daemonsUnder(agent.dir)).toEqual([]);
  });

  it("hot-adds a vhost-user-blk volume to a running VM, the guest writes it, hot-removes it, and a second VM reads the data", async () => {
    await volume("vu", VolumeBackend.VHOST_USER_BLK);
    // Nothing serves a volume no VM uses.
    expect((await block.getVolume({ name: "volumes/vu" })).backendAddress).toBe("");
    expect(await daemonsUnder(agent.dir)).toEqual([]);

    await vm("first");
    const set = [{ action: DeviceChangeAction.BIND, device: disk("data", "volumes/vu") }];
    const applied = await c.vms.commitVmDeviceChanges({ name: "vms/first", changes: set });
    expect(applied.results.map((r) => [r.outcome, r.error?.message])).toEqual([
      [DeviceChangeOutcome.APPLIED, undefined],
    ]);
    expect(applied.vm?.devices).toMatchObject([{ id: "data", state: VmDeviceState.BOUND }]);
    const again = await c.vms.commitVmDeviceChanges({ name: "vms/first", changes: set });
    expect(again.results.map((r) => r.outcome)).toEqual([DeviceChangeOutcome.NOOP]);

    // One storage daemon serves it, over the socket the volume names; QEMU has a vhost-user-blk device.
    const v = await block.getVolume({ name: "volumes/vu" });
    expect(v.backendAddress).toMatch(/\/block\/daemons\/vu\/export\.sock$/);
    expect(await daemonsUnder(agent.dir)).toHaveLength(1);
    const tree = JSON.stringify(
      (await c.vms.executeQmpCommand({ name: "vms/first", command: "query-pci" })).returnValue,
    );
    expect(tree).toContain("disk-data");

    await consoleRun(
      c,
      "vms/first",
      "until [ -b /dev/vda ]; do sleep 0.2; done; echo seen-$((1+1))",
      /seen-2/,
    );
    await consoleRun(
      c,
      "vms/first",
      "echo vmenv-vhost-42 | dd of=/dev/vda bs=512 conv=sync 2>/dev/null; sync; echo wrote-$((2+1))",
      /wrote-3/,
    );
    // Growing it while the guest has it open is refused, naming the VM: QEMU 7.2's vhost-user-blk
    // export cannot tell the guest of a new size (plain-file volumes grow live: see below).
    const grow = await block.resizeVolume({ name: "volumes/vu", sizeBytes: 96n * MIB }).then(
      () => undefined,
      (x) => x,
    );
    expect(grow?.code).toBe(Code.FailedPrecondition);
    expect(grow?.findDetails(ErrorInfoSchema)[0]).toMatchObject({
      reason: "VOLUME_LIVE_RESIZE_UNSUPPORTED",
      metadata: { vm: "vms/first" },
    });
    expect((await block.getVolume({ name: "volumes/vu" })).sizeBytes).toBe(64n * MIB);

    // A vhost-user-blk export serves one VM: another running VM cannot bind it meanwhile.
    await vm("other");
    const busy = await c.vms.commitVmDeviceChanges({
      name: "vms/other",
      changes: [{ action: DeviceChangeAction.BIND, device: disk("data", "volumes/vu") }],
    });
    expect(busy.results[0]?.outcome).toBe(DeviceChangeOutcome.ERROR);
    expect(busy.results[0]?.error?.code).toBe(Code.FailedPrecondition);
    expect(busy.results[0]?.error?.message).toMatch(/vms\/first/);
    await deleteVm("other");

    // Hot-remove: the guest releases the disk; nothing uses the volume, so its daemon stops.
    const off = await c.vms.commitVmDeviceChanges({
      name: "vms/first",
      changes: [
        { action: DeviceChangeAction.UNBIND, device: byId("data") },
        { action: DeviceChangeAction.LEAVE, device: byId("data") },
      ],
    });
    expect(off.results.map((r) => [r.outcome, r.error?.message])).toEqual([
      [DeviceChangeOutcome.APPLIED, undefined],
      [DeviceChangeOutcome.APPLIED, undefined],
    ]);
    await consoleRun(
      c,
      "vms/first",
      "while [ -b /dev/vda ]; do sleep 0.2; done; echo gone-$((3+1))",
      /gone-4/,
    );
    await until(
      () => daemonsUnder(agent.dir),
      (p) => p.length === 0,
      20_000,
      "storage daemon stopped",
    );
    expect((await block.getVolume({ name: "volumes/vu" })).backendAddress).toBe("");

    // A second VM gets it read-only at create time, reads what the first wrote, and cannot write.
    await vm("second", [{ id: "data", volume: "volumes/vu", readOnly: true }]);
    const read = await consoleRun(
      c,
      "vms/second",
      "head -c 15 /dev/vda | tr a-z A-Z; echo",
      /VMENV-VHOST-42/,
    );
    expect(read[0]).toBe("VMENV-VHOST-42");
    await consoleRun(c, "vms/second", "echo ro-$(cat /sys/block/vda/ro)", /ro-1/);

    // Deleting the VM stops the daemon; the volume is free again.
    await deleteVm("second");
    await until(
      () => daemonsUnder(agent.dir),
      (p) => p.length === 0,
      20_000,
      "storage daemon stopped",
    );
    await done(c, await block.deleteVolume({ name: "volumes/vu" }));
  });

  it("serves an NBD volume to a VM that writes it, then to a second VM that reads it", async () => {
    await volume("nb", VolumeBackend.NBD, 32n);
    await vm("n1", [{ id: "data", volume: "volumes/nb", readOnly: false }]);
    expect((await block.getVolume({ name: "volumes/nb" })).backendAddress).toMatch(
      /^nbd\+unix:\/\/\/nb\?socket=.*\/block\/daemons\/nb\/export\.sock$/,
    );
    await consoleRun(
      c,
      "vms/n1",
      "echo vmenv-nbd-7 | dd of=/dev/vda bs=512 conv=sync 2>/dev/null; sync; echo wrote-$((2+1))",
      /wrote-3/,
    );
    await deleteVm("n1");
    await until(
      () => daemonsUnder(agent.dir),
      (p) => p.length === 0,
      20_000,
      "storage daemon stopped",
    );
    await vm("n2", [{ id: "data", volume: "volumes/nb", readOnly: true }]);
    const read = await consoleRun(c, "vms/n2", "head -c 12 /dev/vda | tr a-z A-Z; echo", /VMENV-NBD-7/);
    expect(read[0]).toBe("VMENV-NBD-7");
    // In use: the error names the VM.
    const e = await block.deleteVolume({ name: "volumes/nb" }).then(
      () => undefined,
      (x) => x,
    );
    expect(e?.findDetails(ErrorInfoSchema)[0]?.metadata.vm).toBe("vms/n2");
    await deleteVm("n2");
    await done(c, await block.deleteVolume({ name: "volumes/nb" }));
    await until(
      () => daemonsUnder(agent.dir),
      (p) => p.length === 0,
      20_000,
      "storage daemon stopped",
    );
  });

  it("grows a plain-file volume attached to a running VM, and the guest sees the new size", async () => {
    await volume("plain", VolumeBackend.FILE, 16n);
    await vm("p1", [{ id: "data", volume: "volumes/plain", readOnly: false }]);
    await consoleRun(c, "vms/p1", "cat /sys/block/vda/size", /\n32768\r?\n/);
    await done(c, await block.resizeVolume({ name: "volumes/plain", sizeBytes: 48n * MIB }));
    expect((await block.getVolume({ name: "volumes/plain" })).sizeBytes).toBe(48n * MIB);
    await consoleRun(
      c,
      "vms/p1",
      "until grep -q 98304 /sys/block/vda/size; do sleep 0.2; done; echo size-$(cat /sys/block/vda/size)",
      /size-98304/,
    );
    await deleteVm("p1");
    await done(c, await block.deleteVolume({ name: "volumes/plain" }));
  });
});
