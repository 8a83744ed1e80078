import { Code } from "@connectrpc/connect";
import { MemberState, OperationState } from "@vmenv/api/coordinator/v1";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  agentClients,
  type CoordinatorClients,
  type Fleet,
  failure,
  finalOp,
  guestMember,
  startFleet,
  succeeded,
  vmsOn,
} from "./support/env.js";

const ENV = "crash";
const MEMBERS = ["m-1", "m-2"];

/**
 * The coordinator is SIGKILLed at every crash point of an environment create and of a delete
 * (VMENV_COORDINATOR_CRASH_POINT=N: the engine kills its process at the N-th point it passes), then
 * restarted on the same store; the operation must converge and the agents must hold exactly one VM per
 * member (none after the delete), with the tree's usage matching.
 */
describe("coordinator crash at every crash point of environment create and delete", () => {
  let fleet: Fleet;

  const start = (env: NodeJS.ProcessEnv = {}, args: string[] = []) => fleet.startCoordinator({ env, args });
  const stop = () => fleet.stopCoordinator();

  beforeAll(async () => {
    fleet = await startFleet({
      agents: 2,
      collectorIntervalMs: 60_000,
      node: { id: "crashing", policy: { maxVms: 2 } },
    });
    await stop();
  }, 120_000);
  afterAll(() => fleet?.stop());

  const createRequest = async (requestId: string) => ({
    environmentId: ENV,
    environment: {
      node: "nodes/crashing",
      members: [await guestMember("m-1", "a", { volumeMib: 16 }), await guestMember("m-2", "b")],
    },
    requestId,
  });

  /** A create that fails on the agent (m-2's kernel is missing there) after m-1's volume and VM exist. */
  const failingRequest = async (requestId: string) => {
    const r = await createRequest(requestId);
    const bad = r.environment.members[1] as { spec: { boot: { method: { value: { kernelPath: string } } } } };
    bad.spec.boot.method.value.kernelPath = "/nonexistent/vmlinuz";
    return r;
  };

  const vmNames = async () =>
    (await Promise.all(fleet.agents.map(vmsOn)))
      .flat()
      .map((v) => v.name)
      .sort();
  const volumeNames = async () =>
    (
      await Promise.all(
        fleet.agents.map(
          async (a) =>
            (
              await agentClients(a).blocks.listVolumes({
                labels: { "vmenv.dev/managed-by": "vmenv-coordinator" },
              })
            ).volumes,
        ),
      )
    )
      .flat()
      .map((v) => v.name)
      .sort();
  const treeVms = async (c: CoordinatorClients) =>
    (await c.tree.getNode({ name: "nodes/crashing" })).usage?.vms ?? 0;
  const allocatedVms = async (c: CoordinatorClients) => {
    let n = 0;
    for (const id of ["a1", "a2"])
      n += (await c.agents.getAgent({ name: `agents/${id}` })).allocated?.vms ?? 0;
    return n;
  };

  /** The environment exists with every member once, where it says, and the counts match. */
  async function expectCreated(c: CoordinatorClients) {
    const env = await c.envs.getEnvironment({ name: `environments/${ENV}` });
    expect(env.members.map((m) => m.id)).toEqual(MEMBERS);
    for (const m of env.members) {
      expect(m.state).toBe(MemberState.STOPPED);
      const on = await vmsOn(fleet.agentOf(m.agent));
      expect(on.map((v) => v.name)).toContain(`vms/${ENV}-${m.id}`);
    }
    expect(await vmNames()).toEqual(MEMBERS.map((m) => `vms/${ENV}-${m}`));
    expect(await volumeNames()).toEqual([`volumes/${ENV}-m-1-data`]);
    expect(await treeVms(c)).toBe(2);
    expect(await allocatedVms(c)).toBe(2);
  }

  /** Nothing of the environment is left anywhere. */
  async function expectGone(c: CoordinatorClients) {
    expect((await failure(c.envs.getEnvironment({ name: `environments/${ENV}` }))).code).toBe(Code.NotFound);
    expect(await vmNames()).toEqual([]);
    expect(await volumeNames()).toEqual([]);
    expect(await treeVms(c)).toBe(0);
    expect(await allocatedVms(c)).toBe(0);
  }

  /** Counts the crash points an operation passes (debug log lines of one clean run). */
  function countPoints(log: string, op: string): number {
    return log
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as { msg?: string; op?: string; crashPoint?: number })
      .filter((j) => j.msg === "crash point" && j.op === op).length;
  }

  it("converges after a crash at every point, with exactly one VM per member", async () => {
    // One clean run with debug logs counts the points of each operation.
    const c = await start({}, ["--log-level", "debug"]);
    const created = await succeeded(c, c.envs.createEnvironment(await createRequest("count-create")));
    await expectCreated(c);
    const deleted = await succeeded(
      c,
      c.envs.deleteEnvironment({ name: `environments/${ENV}`, requestId: "count-delete" }),
    );
    await expectGone(c);
    const failed = await finalOp(c, await c.envs.createEnvironment(await failingRequest("count-failing")));
    expect(failed.state).toBe(OperationState.FAILED);
    expect(failed.error?.message).toContain("/nonexistent/vmlinuz");
    await expectGone(c);
    const log = fleet.coord.log();
    const createPoints = countPoints(log, created.name);
    const deletePoints = countPoints(log, deleted.name);
    const rollbackPoints = countPoints(log, failed.name);
    await stop();
    expect(createPoints).toBeGreaterThanOrEqual(12);
    expect(deletePoints).toBeGreaterThanOrEqual(9);
    expect(rollbackPoints).toBeGreaterThan(createPoints / 2);

    const outcomes: string[] = [];
    for (let n = 1; n <= createPoints; n++) {
      const rid = `create-${n}`;
      const op = await fleet.crashAt(n, rid, async (x) => x.envs.createEnvironment(await createRequest(rid)));
      outcomes.push(`${n}:${OperationState[op.state].toLowerCase()}`);
      if (op.state === OperationState.SUCCEEDED) await expectCreated(c);
      else {
        expect(op.state, `create after crash point ${n}: ${op.error?.message}`).toBe(OperationState.FAILED);
        await expectGone(c);
      }
      if (op.state === OperationState.SUCCEEDED)
        await succeeded(c, c.envs.deleteEnvironment({ name: `environments/${ENV}` }));
      await expectGone(c);
      await stop();
    }

    for (let n = 1; n <= deletePoints; n++) {
      await start();
      await succeeded(c, c.envs.createEnvironment(await createRequest(`setup-${n}`)));
      await stop();
      const rid = `delete-${n}`;
      const op = await fleet.crashAt(n, rid, (x) =>
        x.envs.deleteEnvironment({ name: `environments/${ENV}`, requestId: rid }),
      );
      expect(op.state, `delete after crash point ${n}: ${op.error?.message}`).toBe(OperationState.SUCCEEDED);
      await expectGone(c);
      await stop();
    }
    // A create that fails and rolls back: a crash anywhere, forward or during the rollback, still
    // ends FAILED with nothing left.
    for (let n = 1; n <= rollbackPoints; n++) {
      const rid = `failing-${n}`;
      const op = await fleet.crashAt(n, rid, async (x) =>
        x.envs.createEnvironment(await failingRequest(rid)),
      );
      expect(op.state, `failing create after crash point ${n}`).toBe(OperationState.FAILED);
      await expectGone(c);
      await stop();
    }
    process.stdout.write(
      `crash points covered: ${createPoints} of environment.create (outcomes ${outcomes.join(" ")}), ${deletePoints} of environment.delete (all succeeded), ${rollbackPoints} of a failing environment.create (all rolled back)\n`,
    );
  }, 600_000);
});
