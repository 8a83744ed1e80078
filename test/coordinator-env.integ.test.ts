import { Code } from "@connectrpc/connect";
import { VmService, VmState } from "@vmenv/api/agent/v1";
import { EnvironmentState, MemberState, OperationState, StepState } from "@vmenv/api/coordinator/v1";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { addUsage, usageFromStore, usageToStore } from "../packages/coordinator/src/domain/usage.js";
import { keys } from "../packages/coordinator/src/store/keys.js";
import { openLevelStore } from "../packages/coordinator/src/store/level.js";
import { ResourceTree } from "../packages/coordinator/src/tree/tree.js";
import { cliMain, run } from "./support/agent.js";
import {
  agentClients,
  type CoordinatorClients,
  envOf,
  type Fleet,
  failure,
  finalOp,
  guestMember,
  startFleet,
  succeeded,
  vmsOn,
} from "./support/env.js";
import { guestImage } from "./support/guest.js";
import { MIB, until } from "./support/vm.js";

describe("environments: real coordinator, two real agents, QEMU under TCG", () => {
  let fleet: Fleet;
  let c: CoordinatorClients;

  const agentOf = (id: string) => fleet.agentOf(id);
  const allVms = async () => (await Promise.all(fleet.agents.map(vmsOn))).flat();
  const zeroUsage = { vms: 0, vcpus: 0, memoryBytes: 0n, blockBytes: 0n, gpus: 0, gpuMemoryBytes: 0n };
  const usageOf = async (node: string) => {
    const u = (await c.tree.getNode({ name: `nodes/${node}` })).usage;
    return {
      ...zeroUsage,
      ...(u ? { vms: u.vms, vcpus: u.vcpus, memoryBytes: u.memoryBytes, blockBytes: u.blockBytes } : {}),
    };
  };
  const vmenv = (...args: string[]) =>
    run(process.execPath, [cliMain, "--coordinator", fleet.coord.socket, ...args], {
      timeoutMs: 60_000,
    });
  const allocated = async () =>
    Promise.all(
      fleet.ids.map(async (id) => (await c.agents.getAgent({ name: `agents/${id}` })).allocated?.vms ?? 0),
    );

  beforeAll(async () => {
    fleet = await startFleet({ agents: 2, collectorIntervalMs: 300 });
    c = fleet.c;
  }, 120_000);
  afterAll(() => fleet?.stop());

  it("places web×2 (hard anti-affinity) + db on two agents, adds web-lb, runs, suspends, resumes, stops and destroys it", async () => {
    await c.tree.createNode({
      nodeId: "acme",
      node: { policy: { maxVms: 8, maxVcpus: 8, maxMemoryBytes: 2048n * MIB, maxBlockBytes: 1024n * MIB } },
    });
    await c.tree.createNode({ parent: "nodes/acme", nodeId: "shop", node: { policy: { maxVms: 4 } } });
    const web = ["web"];
    const created = await succeeded(
      c,
      c.envs.createEnvironment({
        environmentId: "shop",
        environment: {
          node: "nodes/acme/shop",
          members: [
            await guestMember("web-1", "web", { antiAffinityRoles: web }),
            await guestMember("web-2", "web", { antiAffinityRoles: web }),
            await guestMember("db-1", "db", { volumeMib: 64 }),
          ],
        },
        start: true,
      }),
    );
    const env = envOf(created);
    expect(env.state).toBe(EnvironmentState.RUNNING);
    expect(env.members.map((m) => m.id)).toEqual(["web-1", "web-2", "db-1", "web-lb"]);
    const m = Object.fromEntries(env.members.map((x) => [x.id, x]));
    expect(m["web-1"]?.agent).not.toBe(m["web-2"]?.agent);
    expect(new Set(env.members.map((x) => x.agent))).toEqual(new Set(["agents/a1", "agents/a2"]));
    expect(m["web-lb"]).toMatchObject({
      kind: "balancer",
      addedBy: "web-2",
      outputs: { upstreams: "web-1,web-2" },
    });
    for (const x of env.members) expect(x.state).toBe(MemberState.RUNNING);

    // What the agents run: one VM per member, where the coordinator says, running; the balancer's
    // upstreams on its labels; db-1's volume beside its VM.
    const vms = await allVms();
    expect(vms.map((v) => v.name).sort()).toEqual([
      "vms/shop-db-1",
      "vms/shop-web-1",
      "vms/shop-web-2",
      "vms/shop-web-lb",
    ]);
    for (const x of env.members) {
      const vm = await agentClients(agentOf(x.agent)).vms.getVm({ name: x.vm });
      expect(vm.state).toBe(VmState.RUNNING);
    }
    const lb = await agentClients(agentOf(m["web-lb"]?.agent ?? "")).vms.getVm({ name: "vms/shop-web-lb" });
    expect(lb.labels["vmenv.dev/upstreams"]).toBe("web-1,web-2");
    const vol = await agentClients(agentOf(m["db-1"]?.agent ?? "")).blocks.getVolume({
      name: "volumes/shop-db-1-data",
    });
    expect(vol.sizeBytes).toBe(64n * MIB);
    expect(await usageOf("acme/shop")).toEqual({
      ...zeroUsage,
      vms: 4,
      vcpus: 4,
      memoryBytes: 512n * MIB,
      blockBytes: 64n * MIB,
    });
    expect(await usageOf("acme")).toEqual(await usageOf("acme/shop"));
    expect((await allocated()).reduce((a, b) => a + b, 0)).toBe(4);

    // Same id, same environment: the first operation again, nothing new.
    const again = await c.envs.createEnvironment({
      environmentId: "shop",
      environment: {
        node: "nodes/acme/shop",
        members: [
          await guestMember("web-1", "web", { antiAffinityRoles: web }),
          await guestMember("web-2", "web", { antiAffinityRoles: web }),
          await guestMember("db-1", "db", { volumeMib: 64 }),
        ],
      },
      start: true,
    });
    expect(again.name).toBe(created.name);
    // Same id, another environment: ALREADY_EXISTS.
    const clash = await failure(
      c.envs.createEnvironment({
        environmentId: "shop",
        environment: { node: "nodes/acme/shop", members: [await guestMember("x-1", "x")] },
      }),
    );
    expect(clash.code).toBe(Code.AlreadyExists);

    const stateOnAgents = async () =>
      Promise.all(
        env.members.map(async (x) => (await agentClients(agentOf(x.agent)).vms.getVm({ name: x.vm })).state),
      );
    const suspended = envOf(await succeeded(c, c.envs.suspendEnvironment({ name: "environments/shop" })));
    expect(suspended.state).toBe(EnvironmentState.SUSPENDED);
    expect(await stateOnAgents()).toEqual([VmState.PAUSED, VmState.PAUSED, VmState.PAUSED, VmState.PAUSED]);

    const resumed = envOf(await succeeded(c, c.envs.resumeEnvironment({ name: "environments/shop" })));
    expect(resumed.state).toBe(EnvironmentState.RUNNING);
    expect(await stateOnAgents()).toEqual([
      VmState.RUNNING,
      VmState.RUNNING,
      VmState.RUNNING,
      VmState.RUNNING,
    ]);

    const stopped = envOf(
      await succeeded(c, c.envs.stopEnvironment({ name: "environments/shop", force: true })),
    );
    expect(stopped.state).toBe(EnvironmentState.STOPPED);
    expect(await stateOnAgents()).toEqual([
      VmState.STOPPED,
      VmState.STOPPED,
      VmState.STOPPED,
      VmState.STOPPED,
    ]);
    expect((await c.envs.getEnvironment({ name: "environments/shop" })).state).toBe(EnvironmentState.STOPPED);

    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/shop" }));
    expect((await failure(c.envs.getEnvironment({ name: "environments/shop" }))).code).toBe(Code.NotFound);
    expect(await allVms()).toEqual([]);
    for (const a of fleet.agents) {
      const { volumes } = await agentClients(a).blocks.listVolumes({
        labels: { "vmenv.dev/managed-by": "vmenv-coordinator" },
      });
      expect(volumes).toEqual([]);
    }
    expect(await usageOf("acme/shop")).toEqual(zeroUsage);
    expect(await usageOf("acme")).toEqual(zeroUsage);
    expect(await allocated()).toEqual([0, 0]);
  }, 240_000);

  it("follows a role with the balancer as members are added and removed", async () => {
    await c.tree.createNode({ nodeId: "lab", node: { policy: { maxVms: 6 } } });
    // Created with the CLI's quick form; it waits for the operation and prints the members.
    const { kernel, initrd } = await guestImage();
    const created = await vmenv(
      "env",
      "create",
      "lab",
      "--node",
      "lab",
      "--member",
      "api-1:api",
      "--kernel",
      kernel,
      "--initrd",
      initrd,
    );
    expect(created.stderr).toBe("");
    expect(created.code).toBe(0);
    expect(created.stdout).toMatch(/^api-1\s+api\s+vm\s+stopped\s+a[12]\s+lab-api-1/m);
    const added = envOf(
      await succeeded(
        c,
        c.envs.addMember({ name: "environments/lab", member: await guestMember("api-2", "api") }),
      ),
    );
    expect(added.members.map((x) => x.id)).toEqual(["api-1", "api-2", "api-lb"]);
    expect(added.members.find((x) => x.id === "api-lb")?.outputs.upstreams).toBe("api-1,api-2");
    const third = envOf(
      await succeeded(
        c,
        c.envs.addMember({ name: "environments/lab", member: await guestMember("api-3", "api") }),
      ),
    );
    const lb = third.members.find((x) => x.id === "api-lb");
    expect(lb?.outputs.upstreams).toBe("api-1,api-2,api-3");
    const lbVm = () => agentClients(agentOf(lb?.agent ?? "")).vms.getVm({ name: "vms/lab-api-lb" });
    expect((await lbVm()).labels["vmenv.dev/upstreams"]).toBe("api-1,api-2,api-3");

    const two = envOf(
      await succeeded(c, c.envs.removeMember({ name: "environments/lab", memberId: "api-2", force: true })),
    );
    expect(two.members.find((x) => x.id === "api-lb")?.outputs.upstreams).toBe("api-1,api-3");
    expect((await lbVm()).labels["vmenv.dev/upstreams"]).toBe("api-1,api-3");
    const shown = await vmenv("env", "get", "lab");
    expect(shown.stdout).toMatch(
      /^api-lb\s+api-lb\s+balancer\s+stopped\s+a[12]\s+lab-api-lb\s+upstreams=api-1,api-3$/m,
    );
    expect((await vmenv("env", "list")).stdout).toMatch(/^lab\s+lab\s+stopped\s+3\s+3$/m);
    const one = envOf(
      await succeeded(c, c.envs.removeMember({ name: "environments/lab", memberId: "api-3", force: true })),
    );
    expect(one.members.map((x) => x.id)).toEqual(["api-1"]);
    expect((await allVms()).map((v) => v.name)).toEqual(["vms/lab-api-1"]);
    expect((await usageOf("lab")).vms).toBe(1);

    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/lab" }));
    expect(await allVms()).toEqual([]);
    expect(await usageOf("lab")).toEqual(zeroUsage);
  }, 240_000);

  it("refuses an environment that would overrun a common parent of two sibling delegations, leaving nothing", async () => {
    await c.tree.createNode({ nodeId: "corp", node: { policy: { maxVms: 3 } } });
    await c.tree.createNode({ parent: "nodes/corp", nodeId: "a", node: { policy: { maxVms: 2 } } });
    await c.tree.createNode({ parent: "nodes/corp", nodeId: "b", node: { policy: { maxVms: 2 } } });
    await succeeded(
      c,
      c.envs.createEnvironment({
        environmentId: "team-a",
        environment: {
          node: "nodes/corp/a",
          members: [await guestMember("m-1", ""), await guestMember("m-2", "")],
        },
      }),
    );
    const refused = await failure(
      c.envs.createEnvironment({
        environmentId: "team-b",
        environment: {
          node: "nodes/corp/b",
          members: [await guestMember("m-1", ""), await guestMember("m-2", "")],
        },
      }),
    );
    expect(refused.code).toBe(Code.ResourceExhausted);
    expect(refused.info?.reason).toBe("QUOTA_EXCEEDED");
    expect(refused.info?.metadata.node).toBe("nodes/corp");
    expect((await failure(c.envs.getEnvironment({ name: "environments/team-b" }))).code).toBe(Code.NotFound);
    expect((await allVms()).map((v) => v.name).sort()).toEqual(["vms/team-a-m-1", "vms/team-a-m-2"]);
    expect((await usageOf("corp/b")).vms).toBe(0);
    expect((await usageOf("corp")).vms).toBe(2);

    // Bad input is refused before anything starts, naming the fields.
    const bad = await failure(
      c.envs.createEnvironment({
        environmentId: "Bad_Id",
        environment: {
          node: "nodes/corp/b",
          members: [
            { ...(await guestMember("m-1", "")), spec: { vcpus: 0, memoryBytes: 1n } },
            await guestMember("m-1", ""),
          ],
        },
      }),
    );
    expect(bad.code).toBe(Code.InvalidArgument);
    const unknownNode = await failure(
      c.envs.createEnvironment({ environmentId: "x", environment: { node: "nodes/nope", members: [] } }),
    );
    expect(unknownNode.code).toBe(Code.NotFound);
    // Anti-affinity three ways on two agents cannot be met: FAILED_PRECONDITION naming the member.
    const spread = ["r"];
    const tooSpread = await failure(
      c.envs.createEnvironment({
        environmentId: "spread",
        environment: {
          node: "nodes/corp",
          members: [
            await guestMember("r-1", "r", { antiAffinityRoles: spread }),
            await guestMember("r-2", "r", { antiAffinityRoles: spread }),
            await guestMember("r-3", "r", { antiAffinityRoles: spread }),
          ],
        },
      }),
    );
    expect(tooSpread.code).toBe(Code.FailedPrecondition);
    expect(tooSpread.info?.reason).toBe("NO_AGENT_FITS");

    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/team-a" }));
    expect(await allVms()).toEqual([]);
    expect(await usageOf("corp")).toEqual(zeroUsage);
  }, 180_000);

  it("rolls back a create that fails on an agent, leaving no VM, volume, usage or record", async () => {
    await c.tree.createNode({ nodeId: "roll", node: { policy: { maxVms: 4 } } });
    const bad = await guestMember("bad-1", "b");
    (bad.spec as { boot: { method: { value: { kernelPath: string } } } }).boot.method.value.kernelPath =
      "/nonexistent/vmlinuz";
    const op = await finalOp(
      c,
      await c.envs.createEnvironment({
        environmentId: "roll",
        environment: {
          node: "nodes/roll",
          members: [await guestMember("ok-1", "a", { volumeMib: 16 }), bad],
        },
        start: true,
      }),
    );
    expect(op.state).toBe(OperationState.FAILED);
    expect(op.error?.message).toContain("/nonexistent/vmlinuz");
    expect(op.steps.find((s) => s.id === "vm.ok-1")?.state).toBe(StepState.ROLLED_BACK);
    expect((await failure(c.envs.getEnvironment({ name: "environments/roll" }))).code).toBe(Code.NotFound);
    expect(await allVms()).toEqual([]);
    for (const a of fleet.agents)
      expect(
        (await agentClients(a).blocks.listVolumes({ labels: { "vmenv.dev/environment": "roll" } })).volumes,
      ).toEqual([]);
    expect(await usageOf("roll")).toEqual(zeroUsage);
    expect(await allocated()).toEqual([0, 0]);
  }, 120_000);

  it("collects a VM nobody owns and an expired reservation", async () => {
    // A VM with the coordinator's labels that no environment has: the collector removes it.
    const { kernel, initrd } = await guestImage();
    const a1 = agentOf("a1");
    const vms = createDaemonClient(VmService, { socket: a1.socket, timeoutMs: 60_000 });
    await vms.createVm({
      vmId: "ghost-m",
      vm: {
        labels: {
          "vmenv.dev/environment": "ghost",
          "vmenv.dev/member": "m",
          "vmenv.dev/managed-by": "vmenv-coordinator",
        },
        spec: {
          vcpus: 1,
          memoryBytes: 128n * MIB,
          boot: { method: { case: "directKernel", value: { kernelPath: kernel, initrdPath: initrd } } },
        },
      },
    });
    // …but not a VM without its labels.
    await vms.createVm({
      vmId: "mine",
      vm: {
        spec: {
          vcpus: 1,
          memoryBytes: 128n * MIB,
          boot: { method: { case: "directKernel", value: { kernelPath: kernel, initrdPath: initrd } } },
        },
      },
    });
    await until(
      () => vmsOn(a1),
      (l) => l.map((v) => v.name).join() === "vms/mine",
      30_000,
      "ghost VM collected",
    );
    expect(fleet.coord.log()).toContain("collector removed a VM no environment member owns");
    await vms.deleteVm({ name: "vms/mine", force: true });

    // A reservation left by an operation that no longer exists (written as a crash would leave it:
    // claim, tree usage and agent allocation in one batch) is released once past its deadline.
    await c.tree.createNode({ nodeId: "held", node: { policy: { maxVms: 1 } } });
    await fleet.stopCoordinator();
    const store = await openLevelStore(fleet.coord.dataDir);
    const u = { vms: 1, vcpus: 1, memoryBytes: 128n * MIB, blockBytes: 0n, gpus: 0, gpuMemoryBytes: 0n };
    await store.transact(async (tx) => {
      await new ResourceTree(store, { now: Date.now }).charge(tx, "held", u);
      const alloc = usageFromStore(await tx.get(keys.alloc("a1")));
      tx.put(keys.alloc("a1"), usageToStore(addUsage(alloc, u)));
      tx.put(keys.claim("gone-op.m"), {
        op: "gone-op",
        env: "gone",
        member: "m",
        agent: "a1",
        node: "held",
        usage: usageToStore(u),
        deadlineMs: Date.now() - 1,
      });
    });
    await store.close();
    await fleet.startCoordinator();
    await until(
      () => usageOf("held"),
      (x) => x.vms === 0,
      30_000,
      "reservation released",
    );
    expect(await allocated()).toEqual([0, 0]);
    expect(fleet.coord.log()).toContain("collector released an expired reservation");
    // The room is usable again.
    const ok = await finalOp(
      c,
      await c.envs.createEnvironment({
        environmentId: "held",
        environment: { node: "nodes/held", members: [await guestMember("h-1", "")] },
      }),
    );
    expect(ok.state).toBe(OperationState.SUCCEEDED);
    await succeeded(c, c.envs.deleteEnvironment({ name: "environments/held" }));
  }, 120_000);
});
