import { rm } from "node:fs/promises";
import { create } from "@bufbuild/protobuf";
import { FieldMaskSchema } from "@bufbuild/protobuf/wkt";
import { type Client, Code, ConnectError } from "@connectrpc/connect";
import { type Node, ResourceService } from "@vmenv/api/coordinator/v1";
import { BadRequestSchema, ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createDaemonClient } from "@vmenv/rpc";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ZERO_USAGE } from "../packages/coordinator/src/domain/usage.js";
import { openLevelStore } from "../packages/coordinator/src/store/level.js";
import { ResourceTree } from "../packages/coordinator/src/tree/tree.js";
import { cliMain, run } from "./support/agent.js";
import { type RunningCoordinator, startCoordinator } from "./support/coordinator.js";

/** The runner's own VMENV_* variables, unset, so that only what a test passes reaches the CLI. */
const noVmenvEnv: NodeJS.ProcessEnv = Object.fromEntries(
  Object.keys(process.env)
    .filter((k) => k.startsWith("VMENV_"))
    .map((k) => [k, undefined]),
);

const GIB = 1n << 30n;

/** The ConnectError a call fails with, with its ErrorInfo and field violations. */
async function refusal(p: Promise<unknown>) {
  try {
    await p;
  } catch (e) {
    if (!(e instanceof ConnectError)) throw e;
    const [info] = e.findDetails(ErrorInfoSchema);
    const fields = e.findDetails(BadRequestSchema).flatMap((b) => b.fieldViolations.map((v) => v.field));
    return {
      code: e.code,
      message: e.rawMessage,
      reason: info?.reason,
      metadata: info?.metadata ?? {},
      fields,
    };
  }
  throw new Error("expected the call to fail");
}

describe("resource tree through a real coordinator", () => {
  let coord: RunningCoordinator | undefined;
  let dir = "";
  let api: Client<typeof ResourceService>;
  const vmenv = (args: string[]) =>
    run(process.execPath, [cliMain, "--coordinator", coord?.socket ?? "", ...args], {
      env: noVmenvEnv,
      timeoutMs: 30_000,
    });

  beforeAll(async () => {
    coord = await startCoordinator([], {}, { keepDir: true });
    dir = coord.dir;
    api = createDaemonClient(ResourceService, { address: coord.address, timeoutMs: 10_000 });
  });
  afterAll(async () => {
    await coord?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("creates a tree through the API (TCP) and shows it in tree order with usage", async () => {
    const acme = await api.createNode({
      nodeId: "acme",
      node: { description: "ACME Corp", policy: { maxVcpus: 8, maxMemoryBytes: 16n * GIB, maxVms: 10 } },
    });
    expect(acme).toMatchObject({ name: "nodes/acme", parent: "", description: "ACME Corp" });
    expect(acme.policy?.maxVcpus).toBe(8);
    expect(acme.policy?.maxGpus).toBeUndefined();
    expect(acme.usage?.vcpus).toBe(0);
    for (const id of ["web", "db"])
      await api.createNode({ parent: "nodes/acme", nodeId: id, node: { policy: { maxVcpus: 6 } } });
    // Retry-safe replay: the same request id returns the first result.
    const first = await api.createNode({
      parent: "nodes/acme/web",
      nodeId: "prod",
      node: { labels: { env: "prod" } },
      requestId: "7d1c3f4e-prod",
    });
    await api.updateNode({
      node: { name: "nodes/acme/web/prod", description: "changed since" },
      updateMask: create(FieldMaskSchema, { paths: ["description"] }),
    });
    const again = await api.createNode({
      parent: "nodes/acme/web",
      nodeId: "prod",
      node: { labels: { env: "prod" } },
      requestId: "7d1c3f4e-prod",
    });
    expect(again.etag).toBe(first.etag);
    expect(again.description).toBe("");
    expect((await api.getNode({ name: "nodes/acme/web/prod" })).description).toBe("changed since");
    expect(first.parent).toBe("nodes/acme/web");
    const all = await api.listNodes({ recursive: true });
    expect(all.nodes.map((n) => n.name)).toEqual([
      "nodes/acme",
      "nodes/acme/db",
      "nodes/acme/web",
      "nodes/acme/web/prod",
    ]);
    const children = await api.listNodes({ parent: "nodes/acme", pageSize: 1 });
    expect(children.nodes.map((n) => n.name)).toEqual(["nodes/acme/db"]);
    const next = await api.listNodes({
      parent: "nodes/acme",
      pageSize: 1,
      pageToken: children.nextPageToken,
    });
    expect(next.nodes.map((n) => n.name)).toEqual(["nodes/acme/web"]);
    expect(next.nextPageToken).toBe("");
  });

  it("refuses bad requests with the canonical code, ErrorInfo naming the node and field, nothing written", async () => {
    const big = await refusal(
      api.createNode({ parent: "nodes/acme", nodeId: "big", node: { policy: { maxVcpus: 16 } } }),
    );
    expect(big).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "POLICY_EXCEEDS_PARENT",
      message: "nodes/acme/big: policy.max_vcpus 16 exceeds 8 of nodes/acme",
      metadata: { node: "nodes/acme/big", parent: "nodes/acme", field: "policy.max_vcpus", limit: "8" },
    });
    expect((await refusal(api.getNode({ name: "nodes/acme/big" }))).reason).toBe("NODE_NOT_FOUND");

    const badName = await refusal(api.createNode({ parent: "nodes/acme", nodeId: "Bad_Id", node: {} }));
    expect(badName).toMatchObject({
      code: Code.InvalidArgument,
      reason: "INVALID_NODE_ID",
      fields: ["node_id"],
    });
    const cycle = await refusal(api.getNode({ name: "nodes/acme/../acme" }));
    expect(cycle).toMatchObject({ code: Code.InvalidArgument, fields: ["name"] });
    const absurd = await refusal(
      api.createNode({ nodeId: "huge", node: { policy: { maxMemoryBytes: 1n << 62n } } }),
    );
    expect(absurd).toMatchObject({
      code: Code.InvalidArgument,
      fields: ["node.policy.max_memory_bytes"],
      metadata: { node: "nodes/huge", field: "node.policy.max_memory_bytes" },
    });
    const missing = await refusal(api.getNode({ name: "nodes/nope" }));
    expect(missing).toMatchObject({
      code: Code.NotFound,
      reason: "NODE_NOT_FOUND",
      metadata: { node: "nodes/nope" },
    });

    const web = await api.getNode({ name: "nodes/acme/web" });
    await api.updateNode({
      node: { name: "nodes/acme/web", description: "web tier" },
      updateMask: create(FieldMaskSchema, { paths: ["description"] }),
    });
    const stale = await refusal(
      api.updateNode({
        node: { name: "nodes/acme/web", etag: web.etag, policy: { maxVcpus: 4 } },
        updateMask: create(FieldMaskSchema, { paths: ["policy.max_vcpus"] }),
      }),
    );
    expect(stale).toMatchObject({
      code: Code.Aborted,
      reason: "ETAG_MISMATCH",
      metadata: { node: "nodes/acme/web" },
    });
    const outputOnly = await refusal(
      api.updateNode({
        node: { name: "nodes/acme/web" },
        updateMask: create(FieldMaskSchema, { paths: ["usage"] }),
      }),
    );
    expect(outputOnly).toMatchObject({
      code: Code.InvalidArgument,
      reason: "FIELD_NOT_UPDATABLE",
      fields: ["update_mask"],
    });
    const parentShrink = await refusal(
      api.updateNode({
        node: { name: "nodes/acme", policy: { maxVcpus: 4 } },
        updateMask: create(FieldMaskSchema, { paths: ["policy.max_vcpus"] }),
      }),
    );
    expect(parentShrink).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "POLICY_BELOW_CHILD",
      metadata: { node: "nodes/acme", child: "nodes/acme/db", field: "policy.max_vcpus" },
    });
    const hasChildren = await refusal(api.deleteNode({ name: "nodes/acme/web" }));
    expect(hasChildren).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "NODE_HAS_CHILDREN",
      metadata: { node: "nodes/acme/web", child: "nodes/acme/web/prod" },
    });
    const filtered = await refusal(api.listNodes({ filter: 'labels.env = "prod"' }));
    expect(filtered).toMatchObject({ code: Code.InvalidArgument, fields: ["filter"] });
    expect((await api.getNode({ name: "nodes/acme" })).policy?.maxVcpus).toBe(8);
  });

  it("drives the tree from the CLI: create, refusal, list, update, get, delete", async () => {
    let r = await vmenv([
      "tree",
      "create",
      "lab",
      "--max-vcpus",
      "4",
      "--max-memory",
      "8GiB",
      "--description",
      "lab",
    ]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Name:\s+nodes\/lab$/m);
    expect(r.stdout).toMatch(/^Memory:\s+0 B used of 8\.0 GiB$/m);

    r = await vmenv(["tree", "create", "lab/ci", "--max-vcpus", "8"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(
      "vmenv: FAILED_PRECONDITION: nodes/lab/ci: policy.max_vcpus 8 exceeds 4 of nodes/lab",
    );
    expect(r.stderr).toContain("reason POLICY_EXCEEDS_PARENT");

    r = await vmenv([
      "tree",
      "create",
      "lab/ci",
      "--max-vcpus",
      "2",
      "--allow-network",
      "lan",
      "--cpus",
      "0-1",
    ]);
    expect(r.code).toBe(0);
    r = await vmenv(["tree", "list", "-r"]);
    expect(r.code).toBe(0);
    const lines = r.stdout.trim().split("\n");
    expect(lines[0]).toMatch(/^NODE\s+VMS\s+VCPUS\s+MEMORY\s+BLOCK\s+GPUS\s+GPU MEMORY\s+DESCRIPTION$/);
    expect(lines.map((l) => l.split(/\s+/)[0])).toEqual([
      "NODE",
      "acme",
      "acme/db",
      "acme/web",
      "acme/web/prod",
      "lab",
      "lab/ci",
    ]);
    expect(lines.find((l) => l.startsWith("lab/ci"))).toMatch(/^lab\/ci\s+0\/-\s+0\/2\s+0 B\/-/);

    r = await vmenv(["tree", "update", "lab", "--clear-max-vcpus", "--max-vms", "3"]);
    expect(r.stderr).toBe("");
    expect(r.stdout).toMatch(/^vCPUs:\s+0 used of no bound of its own$/m);
    expect(r.stdout).toMatch(/^VMs:\s+0 used of 3$/m);

    r = await vmenv(["-o", "json", "tree", "get", "lab/ci"]);
    const j = JSON.parse(r.stdout) as { name: string; parent: string; policy: Record<string, unknown> };
    expect(j).toMatchObject({ name: "nodes/lab/ci", parent: "nodes/lab" });
    expect(j.policy).toMatchObject({ maxVcpus: 2, allowedNetworks: ["networks/lan"], allowedCpus: [0, 1] });

    r = await vmenv(["tree", "delete", "lab"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("NODE_HAS_CHILDREN");
    for (const p of ["lab/ci", "lab"]) {
      r = await vmenv(["tree", "delete", p]);
      expect(r.stdout).toBe(`deleted nodes/${p}\n`);
    }
    r = await vmenv(["tree", "get", "lab"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("NOT_FOUND");
  });

  it("survives SIGKILL: nodes, policies and usage are there after a restart on the same store", async () => {
    const before = (await api.listNodes({ recursive: true })).nodes;
    await coord?.kill();
    // While it is down, usage is charged in its store as placement will do it (in a store transaction):
    // web takes 6 vCPUs, and the refused sibling charge of 4 on db names acme, with the numbers.
    const store = await openLevelStore(coord?.dataDir ?? "");
    try {
      const tree = new ResourceTree(store, { now: () => Date.now() });
      await store.transact((tx) => tree.charge(tx, "acme/web/prod", { ...ZERO_USAGE, vms: 2, vcpus: 6 }));
      await expect(
        store.transact((tx) => tree.charge(tx, "acme/db", { ...ZERO_USAGE, vms: 1, vcpus: 4 })),
      ).rejects.toMatchObject({
        reason: "QUOTA_EXCEEDED",
        message: "nodes/acme: max_vcpus would be exceeded: 6 used + 4 requested > 8",
      });
    } finally {
      await store.close();
    }
    coord = await startCoordinator([], {}, { dir, keepDir: true });
    api = createDaemonClient(ResourceService, { socket: coord.socket, timeoutMs: 10_000 });

    const after = (await api.listNodes({ recursive: true })).nodes;
    const strip = (ns: Node[]) =>
      ns.map((n) => ({ name: n.name, policy: n.policy, etag: n.etag, description: n.description }));
    expect(strip(after)).toEqual(strip(before));
    const usage = Object.fromEntries(after.map((n) => [n.name, n.usage?.vcpus]));
    expect(usage).toEqual({
      "nodes/acme": 6,
      "nodes/acme/db": 0,
      "nodes/acme/web": 6,
      "nodes/acme/web/prod": 6,
    });

    const shrink = await refusal(
      api.updateNode({
        node: { name: "nodes/acme", policy: { maxVcpus: 5 } },
        updateMask: create(FieldMaskSchema, { paths: ["policy.max_vcpus"] }),
      }),
    );
    expect(shrink).toMatchObject({
      code: Code.FailedPrecondition,
      reason: "POLICY_BELOW_USAGE",
      message: "nodes/acme: policy.max_vcpus 5 is below the 6 already in use under the node",
      metadata: { node: "nodes/acme", field: "policy.max_vcpus", limit: "5", used: "6" },
    });
    const inUse = await refusal(api.deleteNode({ name: "nodes/acme/web/prod" }));
    expect(inUse).toMatchObject({ code: Code.FailedPrecondition, reason: "NODE_IN_USE" });
    const r = await vmenv(["tree", "list", "acme"]);
    expect(r.stdout).toMatch(/^acme\/web\s+2\/-\s+6\/6\s/m);
  });
});
