import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { VmenvError } from "@vmenv/rpc/errors";
import { afterEach, describe, expect, it } from "vitest";
import { type Usage, ZERO_USAGE } from "../domain/usage.js";
import type { BaseStore } from "../store/base.js";
import { keys } from "../store/keys.js";
import { openLevelStore } from "../store/level.js";
import { memoryStore } from "../store/memory.js";
import { emptyPolicy, type Policy } from "./domain.js";
import { patchFromMask } from "./rpc.js";
import { ResourceTree } from "./tree.js";

const dirs: string[] = [];
const stores: BaseStore[] = [];
afterEach(async () => {
  for (const s of stores.splice(0)) await s.close();
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

const kinds: Array<[string, () => Promise<BaseStore>]> = [
  ["memory", async () => memoryStore()],
  [
    "leveldb",
    async () => {
      const dir = await mkdtemp(join(tmpdir(), "vmenv-tree-"));
      dirs.push(dir);
      return openLevelStore(join(dir, "db"));
    },
  ],
];

const pol = (p: Partial<Policy> = {}): Policy => ({ ...emptyPolicy(), ...p });
const spec = (p: Partial<Policy> = {}, description = "") => ({ description, labels: {}, policy: pol(p) });
const use = (u: Partial<Usage>): Usage => ({ ...ZERO_USAGE, ...u });

/** The VmenvError a promise rejects with. */
async function refusal(p: Promise<unknown>): Promise<VmenvError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof VmenvError) return e;
    throw e;
  }
  throw new Error("expected a refusal, got success");
}

describe.each(kinds)("resource tree on the %s store", (_kind, open) => {
  let now = 1_700_000_000_000;
  const setup = async () => {
    const store = await open();
    stores.push(store);
    const tree = new ResourceTree(store, { now: () => now++ });
    return { store, tree };
  };
  /** acme (8 vCPUs) with web and db under it (6 vCPUs each: their sum overruns acme). */
  const acme = async () => {
    const s = await setup();
    await s.tree.createNode("", "acme", spec({ maxVcpus: 8, maxVms: 10 }));
    await s.tree.createNode("acme", "web", spec({ maxVcpus: 6 }));
    await s.tree.createNode("acme", "db", spec({ maxVcpus: 6 }));
    return s;
  };

  it("creates, gets and lists nodes in tree order, with pages", async () => {
    const { tree } = await acme();
    await tree.createNode("acme/web", "prod", spec({}, "production"));
    await tree.createNode("", "acme-x", spec());
    const n = await tree.getNode("acme/web/prod");
    expect(n).toMatchObject({ path: "acme/web/prod", description: "production", usage: ZERO_USAGE });
    expect((await tree.listNodes("")).nodes.map((x) => x.path)).toEqual(["acme", "acme-x"]);
    expect((await tree.listNodes("acme")).nodes.map((x) => x.path)).toEqual(["acme/db", "acme/web"]);
    const all = (await tree.listNodes("", { recursive: true })).nodes.map((x) => x.path);
    expect(all).toEqual(["acme", "acme/db", "acme/web", "acme/web/prod", "acme-x"]);
    const seen: string[] = [];
    let pageToken = "";
    do {
      const p = await tree.listNodes("", { recursive: true, pageSize: 2, pageToken });
      expect(p.nodes.length).toBeLessThanOrEqual(2);
      seen.push(...p.nodes.map((x) => x.path));
      pageToken = p.nextPageToken;
    } while (pageToken);
    expect(seen).toEqual(all);
    expect((await refusal(tree.listNodes("nope"))).reason).toBe("NODE_NOT_FOUND");
    expect((await refusal(tree.listNodes("", { pageToken: "garbage" }))).reason).toBe("INVALID_PAGE_TOKEN");
  });

  it("create is idempotent for the same spec and ALREADY_EXISTS for another; a missing parent is named", async () => {
    const { tree } = await acme();
    const again = await tree.createNode("acme", "web", spec({ maxVcpus: 6 }));
    expect(again.etag).toBe((await tree.getNode("acme/web")).etag);
    const e = await refusal(tree.createNode("acme", "web", spec({ maxVcpus: 5 })));
    expect([e.code, e.reason, e.metadata.node]).toEqual([
      "already-exists",
      "NODE_ALREADY_EXISTS",
      "nodes/acme/web",
    ]);
    const m = await refusal(tree.createNode("nope/deeper", "x", spec()));
    expect([m.code, m.reason, m.metadata.node]).toEqual(["not-found", "NODE_NOT_FOUND", "nodes/nope/deeper"]);
    const d = await refusal(tree.createNode(Array(16).fill("a").join("/"), "x", spec()));
    expect(d.reason).toBe("NODE_TOO_DEEP");
  });

  it("refuses a child policy larger than its parent's, naming the node, field and parent; writes nothing", async () => {
    const { tree, store } = await acme();
    const e = await refusal(tree.createNode("acme", "big", spec({ maxVcpus: 16 })));
    expect(e.code).toBe("failed-precondition");
    expect(e.reason).toBe("POLICY_EXCEEDS_PARENT");
    expect(e.message).toBe("nodes/acme/big: policy.max_vcpus 16 exceeds 8 of nodes/acme");
    expect(e.metadata).toEqual({
      node: "nodes/acme/big",
      parent: "nodes/acme",
      field: "policy.max_vcpus",
      limit: "8",
      requested: "16",
    });
    expect(await store.get(keys.node("acme/big"))).toBeUndefined();
    // The grandparent bounds too, where the parent sets nothing of its own.
    await tree.createNode("acme/web", "free", spec());
    const g = await refusal(tree.createNode("acme/web/free", "x", spec({ maxVms: 11 })));
    expect(g.metadata).toMatchObject({ parent: "nodes/acme", field: "policy.max_vms", limit: "10" });
  });

  it("refuses two sibling delegations whose sum would overrun their parent at charge time, naming the parent", async () => {
    const { tree, store } = await acme();
    await store.transact((tx) => tree.charge(tx, "acme/web", use({ vcpus: 6, vms: 1 })));
    const e = await refusal(store.transact((tx) => tree.charge(tx, "acme/db", use({ vcpus: 4, vms: 1 }))));
    expect(e.code).toBe("resource-exhausted");
    expect(e.reason).toBe("QUOTA_EXCEEDED");
    expect(e.message).toBe("nodes/acme: max_vcpus would be exceeded: 6 used + 4 requested > 8");
    expect(e.metadata).toEqual({
      node: "nodes/acme",
      resource: "max_vcpus",
      limit: "8",
      used: "6",
      requested: "4",
    });
    // Nothing of the refused charge was written; what still fits is accepted.
    expect((await tree.getNode("acme/db")).usage.vcpus).toBe(0);
    expect((await tree.getNode("acme")).usage.vcpus).toBe(6);
    await store.transact((tx) => tree.charge(tx, "acme/db", use({ vcpus: 2 })));
    expect((await tree.getNode("acme")).usage.vcpus).toBe(8);
  });

  it("moves usage up and down the whole path, never below zero, in the caller's transaction", async () => {
    const { tree, store } = await acme();
    await tree.createNode("acme/web", "prod", spec());
    const vm = use({ vms: 1, vcpus: 2, memoryBytes: 1n << 30n, blockBytes: 10n << 30n });
    await store.transact((tx) => tree.charge(tx, "acme/web/prod", vm));
    for (const p of ["acme", "acme/web", "acme/web/prod"]) expect((await tree.getNode(p)).usage).toEqual(vm);
    expect((await tree.getNode("acme/db")).usage).toEqual(ZERO_USAGE);
    expect(await tree.usage(store, "acme/web")).toEqual(vm);
    // A charge whose transaction fails later leaves no trace.
    await expect(
      store.transact(async (tx) => {
        await tree.charge(tx, "acme/web/prod", vm);
        throw new Error("the VM record could not be written");
      }),
    ).rejects.toThrow("could not be written");
    expect((await tree.getNode("acme")).usage).toEqual(vm);
    await store.transact((tx) => tree.release(tx, "acme/web/prod", use({ vcpus: 1 })));
    expect((await tree.getNode("acme")).usage.vcpus).toBe(1);
    await store.transact((tx) =>
      tree.release(
        tx,
        "acme/web/prod",
        use({ vms: 5, vcpus: 5, memoryBytes: 1n << 40n, blockBytes: 1n << 40n }),
      ),
    );
    for (const p of ["acme", "acme/web", "acme/web/prod"]) {
      expect((await tree.getNode(p)).usage).toEqual(ZERO_USAGE);
      expect(await store.get(keys.usage(p))).toBeUndefined();
    }
    const m = await refusal(store.transact((tx) => tree.charge(tx, "acme/nope", vm)));
    expect([m.code, m.reason, m.metadata.node]).toEqual(["not-found", "NODE_NOT_FOUND", "nodes/acme/nope"]);
  });

  it("tells unset (no bound of its own) from 0 (none allowed)", async () => {
    const { tree, store } = await setup();
    await tree.createNode("", "t", spec({ maxGpus: 0 }));
    await store.transact((tx) =>
      tree.charge(tx, "t", use({ vms: 100, vcpus: 1000, memoryBytes: 1n << 50n })),
    );
    const e = await refusal(store.transact((tx) => tree.charge(tx, "t", use({ vms: 1, gpus: 1 }))));
    expect(e.metadata).toMatchObject({
      node: "nodes/t",
      resource: "max_gpus",
      limit: "0",
      used: "0",
      requested: "1",
    });
  });

  it("refuses a policy shrink below the usage under the node, or below a child's policy", async () => {
    const { tree, store } = await acme();
    await store.transact((tx) => tree.charge(tx, "acme/web", use({ vcpus: 5 })));
    const e = await refusal(tree.updateNode("acme", { policy: { maxVcpus: 4 } }));
    expect(e.code).toBe("failed-precondition");
    expect(e.reason).toBe("POLICY_BELOW_USAGE");
    expect(e.message).toBe("nodes/acme: policy.max_vcpus 4 is below the 5 already in use under the node");
    expect(e.metadata).toEqual({ node: "nodes/acme", field: "policy.max_vcpus", limit: "4", used: "5" });
    expect((await tree.getNode("acme")).policy.maxVcpus).toBe(8);
    const c = await refusal(tree.updateNode("acme", { policy: { maxVcpus: 5 } }));
    expect(c.reason).toBe("POLICY_BELOW_CHILD");
    expect(c.metadata).toMatchObject({
      node: "nodes/acme",
      child: "nodes/acme/db",
      field: "policy.max_vcpus",
      limit: "5",
    });
    // Growing a child beyond its parent is the static rule upwards.
    const up = await refusal(tree.updateNode("acme/web", { policy: { maxVcpus: 9 } }));
    expect(up.reason).toBe("POLICY_EXCEEDS_PARENT");
    // Shrinks that still cover usage and children are fine; clearing a limit removes the node's own bound.
    expect((await tree.updateNode("acme/web", { policy: { maxVcpus: 5 } })).policy.maxVcpus).toBe(5);
    const cleared = await tree.updateNode("acme/web", { policy: { maxVcpus: undefined } });
    expect(cleared.policy.maxVcpus).toBeUndefined();
  });

  it("update masks map to patches: fields, clearing, whole policy; output-only and unknown paths refused", async () => {
    const { tree } = await acme();
    const node = {
      description: "d",
      labels: { team: "pay" },
      policy: { maxVms: 3, allowedNetworks: [], allowedHostLabels: {}, allowedCpus: [] },
    };
    let n = await tree.updateNode("acme", patchFromMask(["policy.max_vms", "labels"], node as never));
    expect(n.policy).toMatchObject({ maxVms: 3, maxVcpus: 8 });
    expect(n.labels).toEqual({ team: "pay" });
    expect(n.description).toBe("");
    // "policy" replaces the whole policy: max_vcpus, unset in the request, is cleared.
    n = await tree.updateNode("acme", patchFromMask(["policy"], node as never));
    expect(n.policy.maxVcpus).toBeUndefined();
    expect(n.policy.maxVms).toBe(3);
    for (const [paths, reason] of [
      [["usage"], "FIELD_NOT_UPDATABLE"],
      [["create_time"], "FIELD_NOT_UPDATABLE"],
      [["policy.max_cores"], "UNKNOWN_FIELD"],
      [[], "INVALID_ARGUMENT"],
    ] as const) {
      let err: unknown;
      try {
        patchFromMask(paths, node as never);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(VmenvError);
      expect((err as VmenvError).reason).toBe(reason);
      expect((err as VmenvError).fieldViolations[0]?.field).toBe("update_mask");
    }
  });

  it("refuses a stale etag with ABORTED, on update and delete", async () => {
    const { tree } = await acme();
    await tree.createNode("acme/web", "prod", spec());
    const before = await tree.getNode("acme/web/prod");
    const after = await tree.updateNode("acme/web/prod", { description: "x" }, { etag: before.etag });
    expect(after.etag).not.toBe(before.etag);
    expect(after.updateTimeMs).toBeGreaterThan(before.updateTimeMs);
    const e = await refusal(tree.updateNode("acme/web/prod", { description: "y" }, { etag: before.etag }));
    expect([e.code, e.reason, e.metadata.node]).toEqual(["aborted", "ETAG_MISMATCH", "nodes/acme/web/prod"]);
    expect((await refusal(tree.deleteNode("acme/web/prod", { etag: before.etag }))).code).toBe("aborted");
    // An unchanged update keeps the etag.
    expect((await tree.updateNode("acme/web/prod", { description: "x" })).etag).toBe(after.etag);
    await tree.deleteNode("acme/web/prod", { etag: after.etag });
    expect((await refusal(tree.getNode("acme/web/prod"))).reason).toBe("NODE_NOT_FOUND");
  });

  it("refuses to delete a node with children, usage or environments; allow_missing", async () => {
    const { tree, store } = await acme();
    const c = await refusal(tree.deleteNode("acme"));
    expect([c.code, c.reason, c.metadata.child]).toEqual([
      "failed-precondition",
      "NODE_HAS_CHILDREN",
      "nodes/acme/db",
    ]);
    await store.transact((tx) => tree.charge(tx, "acme/web", use({ vms: 1, vcpus: 1 })));
    const u = await refusal(tree.deleteNode("acme/web"));
    expect([u.reason, u.metadata.node, u.metadata.vms]).toEqual(["NODE_IN_USE", "nodes/acme/web", "1"]);
    await store.transact(async (tx) => tx.put(keys.env("shop"), { node: "acme/db", members: [] }));
    const v = await refusal(tree.deleteNode("acme/db"));
    expect([v.reason, v.metadata.environment]).toEqual(["NODE_HAS_ENVIRONMENTS", "environments/shop"]);
    await store.transact(async (tx) => tx.del(keys.env("shop")));
    await tree.deleteNode("acme/db");
    expect((await refusal(tree.deleteNode("acme/db"))).reason).toBe("NODE_NOT_FOUND");
    await tree.deleteNode("acme/db", { allowMissing: true });
    expect((await tree.listNodes("acme")).nodes.map((n) => n.path)).toEqual(["acme/web"]);
  });

  it("replays a request id with the first result; validate_only writes nothing", async () => {
    const { tree, store } = await acme();
    const first = await tree.createNode("acme", "ci", spec({ maxVcpus: 2 }), { requestId: "r-1" });
    await tree.updateNode("acme/ci", { description: "changed" });
    const replay = await tree.createNode("acme", "ci", spec({ maxVcpus: 2 }), { requestId: "r-1" });
    expect(replay).toEqual(first);
    const reused = await refusal(tree.deleteNode("acme/ci", { requestId: "r-1" }));
    expect([reused.code, reused.reason]).toEqual(["invalid-argument", "REQUEST_ID_REUSED"]);
    await tree.deleteNode("acme/ci", { requestId: "r-2" });
    await tree.deleteNode("acme/ci", { requestId: "r-2" }); // replayed: no NOT_FOUND
    const v = await tree.createNode("acme", "dry", spec({ maxVcpus: 1 }), {
      validateOnly: true,
      requestId: "r-3",
    });
    expect(v.path).toBe("acme/dry");
    expect(await store.get(keys.node("acme/dry"))).toBeUndefined();
    expect(await store.get(keys.nodeRequest("r-3"))).toBeUndefined();
    expect(
      (await refusal(tree.createNode("acme", "dry", spec({ maxVcpus: 9 }), { validateOnly: true }))).reason,
    ).toBe("POLICY_EXCEEDS_PARENT");
    await tree.updateNode("acme", { description: "dry" }, { validateOnly: true });
    expect((await tree.getNode("acme")).description).toBe("");
  });

  it("gives placement the effective allowed lists along the path", async () => {
    const { tree, store } = await setup();
    await tree.createNode(
      "",
      "a",
      spec({ allowedNetworks: ["networks/x", "networks/y"], allowedHostLabels: { zone: "1" } }),
    );
    await tree.createNode("a", "b", spec({ allowedNetworks: ["networks/y"], allowedCpus: [2, 3] }));
    expect(await tree.effectivePolicy(store, "a/b")).toEqual({
      allowedNetworks: ["networks/y"],
      allowedHostLabels: { zone: "1" },
      allowedCpus: [2, 3],
    });
    const e = await refusal(tree.createNode("a", "c", spec({ allowedNetworks: ["networks/z"] })));
    expect(e.metadata).toMatchObject({
      field: "policy.allowed_networks",
      network: "networks/z",
      parent: "nodes/a",
    });
    expect((await refusal(tree.effectivePolicy(store, "a/zz"))).reason).toBe("NODE_NOT_FOUND");
  });
});
