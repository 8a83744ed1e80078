import { anyUnpack } from "@bufbuild/protobuf/wkt";
import { VmSnapshotSchema, VmState } from "@vmenv/api/agent/v1";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type RunningAgent, startAgent } from "./support/agent.js";
import { clients, consoleRun, done, guestVm, isReady, qemusUnder, until } from "./support/vm.js";

/** Reads /tmp/m in the guest, upper-cased so the command's own echo cannot match. */
const readMarker = (c: ReturnType<typeof clients>, vm: string) =>
  consoleRun(c, vm, "tr a-z A-Z < /tmp/m", /MARKER-[A-Z0-9]+/).then((m) => m[0]);

describe("snapshot, restore and clone on real QEMU (TCG)", () => {
  let agent: RunningAgent;
  let c: ReturnType<typeof clients>;
  beforeAll(async () => {
    agent = await startAgent(["--kvm-probe-timeout-ms", "200"]);
    c = clients(agent.socket);
  });
  afterAll(async () => {
    await agent?.stop();
  });

  it("restores a VM to where its snapshot was, and clones it into an independent VM", async () => {
    await done(c, await c.vms.createVm(await guestVm("orig")));
    await until(() => c.vms.getVm({ name: "vms/orig" }), isReady, 90_000, "guest ready");
    await consoleRun(c, "vms/orig", "echo marker-one > /tmp/m; echo wrote-$((1+1))", /wrote-2/);

    const snapOp = await done(
      c,
      await c.vms.snapshotVm({ name: "vms/orig", snapshotId: "s1", includeMemory: true }),
    );
    const snap = snapOp.result ? anyUnpack(snapOp.result, VmSnapshotSchema) : undefined;
    expect(snap?.name).toBe("vms/orig/snapshots/s1");
    expect(snap?.memoryStateBytes).toBeGreaterThan(0n);
    // The VM went on running after the snapshot.
    expect((await c.vms.getVm({ name: "vms/orig" })).state).toBe(VmState.RUNNING);
    await consoleRun(c, "vms/orig", "echo marker-two > /tmp/m; echo wrote-$((2+1))", /wrote-3/);
    expect(await readMarker(c, "vms/orig")).toBe("MARKER-TWO");

    // Restore needs a stopped VM (or force); afterwards the guest is where the snapshot was.
    await done(c, await c.vms.stopVm({ name: "vms/orig", force: true }));
    await done(c, await c.vms.restoreVm({ name: "vms/orig", snapshot: "vms/orig/snapshots/s1" }));
    const restored = await c.vms.getVm({ name: "vms/orig" });
    expect(restored.state).toBe(VmState.RUNNING);
    expect(await readMarker(c, "vms/orig")).toBe("MARKER-ONE");

    // A clone from the snapshot starts where the snapshot was, in its own process, and goes its own way.
    await done(
      c,
      await c.vms.cloneVm({ name: "vms/orig", vmId: "copy", snapshot: "vms/orig/snapshots/s1", start: true }),
    );
    const copy = await c.vms.getVm({ name: "vms/copy" });
    expect(copy.state).toBe(VmState.RUNNING);
    expect(copy.pid).not.toBe(restored.pid);
    expect(await readMarker(c, "vms/copy")).toBe("MARKER-ONE");
    await consoleRun(c, "vms/copy", "echo marker-copy > /tmp/m; echo wrote-$((3+1))", /wrote-4/);
    expect(await readMarker(c, "vms/copy")).toBe("MARKER-COPY");
    expect(await readMarker(c, "vms/orig")).toBe("MARKER-ONE");
    expect((await qemusUnder(agent.dir)).sort()).toEqual([restored.pid, copy.pid].sort());

    const list = await c.vms.listVmSnapshots({ parent: "vms/orig" });
    expect(list.vmSnapshots.map((s) => s.name)).toEqual(["vms/orig/snapshots/s1"]);
    await c.vms.deleteVmSnapshot({ name: "vms/orig/snapshots/s1" });
    expect((await c.vms.listVmSnapshots({ parent: "vms/orig" })).vmSnapshots).toEqual([]);
  });
});
