/**
 * The resource tree on the coordinator's store: node records at `node/{path}`, subtree usage at
 * `usage/{path}`, request-id replay records at `nodereq/{request id}` (keys.ts). The rules themselves
 * are in domain.ts; this class reads what they need inside a store transaction and writes the outcome
 * in the same transaction, so a check and its write can never be split by another writer.
 */
import { alreadyExists, invalidArgument, notFound, VmenvError } from "@vmenv/rpc/errors";
import {
  addUsage,
  isZeroUsage,
  type StoredUsage,
  subUsage,
  type Usage,
  usageFromStore,
  usageToStore,
} from "../domain/usage.js";
import type { Clock } from "../ports.js";
import { keys } from "../store/keys.js";
import type { JsonValue, Store, StoreReader, Txn } from "../store/store.js";
import {
  type ChargeAt,
  checkCharge,
  checkCoversDescendant,
  checkCoversUsage,
  checkDelta,
  checkDescription,
  checkFitsAncestors,
  checkPath,
  checkSegment,
  depthOf,
  type EffectivePolicy,
  effectiveOf,
  emptyPolicy,
  LIMITS,
  type NodeSpec,
  nodeName,
  normaliseLabels,
  normalisePolicy,
  normaliseSpec,
  type Policy,
  type PolicyAt,
  parentOf,
  pathChain,
  treeOrderKey,
} from "./domain.js";

/** A node as the tree shows it: what was set on it, plus the usage of its whole subtree. */
export interface TreeNode {
  /** Bare path, e.g. `acme/web`. */
  path: string;
  description: string;
  labels: Record<string, string>;
  policy: Policy;
  /** Usage of the node's whole subtree (claims included). */
  usage: Usage;
  createTimeMs: number;
  updateTimeMs: number;
  /** Opaque version; changes with every change of description, labels or policy. */
  etag: string;
}

/**
 * Changes to a node. Only the properties present are changed; within `policy`, a property present with
 * the value undefined clears it (a limit: no bound of its own; a list: no restriction of its own).
 */
export interface NodePatch {
  description?: string;
  labels?: Record<string, string>;
  policy?: Partial<Policy>;
}

/** Options shared by the mutations. */
export interface MutationOptions {
  /** Check everything, write nothing. */
  validateOnly?: boolean;
  /** Retry-safe replay: a request id seen before returns the first call's result. */
  requestId?: string;
}

// ---- stored shapes ------------------------------------------------------------------------------

type StoredPolicy = {
  maxVms?: number;
  maxVcpus?: number;
  maxMemoryBytes?: string;
  maxBlockBytes?: string;
  maxGpus?: number;
  maxGpuMemoryBytes?: string;
  allowedNetworks: string[];
  allowedHostLabels: Record<string, string>;
  allowedCpus: number[];
};

type StoredNode = {
  description: string;
  labels: Record<string, string>;
  policy: StoredPolicy;
  createTimeMs: number;
  updateTimeMs: number;
  /** Bumped on every change. */
  generation: number;
};

type StoredRequest = {
  method: "create" | "update" | "delete";
  node: string;
  /** The node the first call returned (create, update); null for delete. */
  result: { node: StoredNode; usage: StoredUsage } | null;
  timeMs: number;
};

function policyToStore(p: Policy): StoredPolicy {
  const s: StoredPolicy = {
    allowedNetworks: [...p.allowedNetworks],
    allowedHostLabels: { ...p.allowedHostLabels },
    allowedCpus: [...p.allowedCpus],
  };
  for (const l of LIMITS) {
    const v = p[l.key];
    // biome-ignore lint/suspicious/noExplicitAny: the key decides number or string
    if (v !== undefined) (s as any)[l.key] = l.bytes ? String(v) : v;
  }
  return s;
}

function policyFromStore(s: StoredPolicy): Policy {
  const p: Policy = {
    allowedNetworks: [...s.allowedNetworks],
    allowedHostLabels: { ...s.allowedHostLabels },
    allowedCpus: [...s.allowedCpus],
  };
  for (const l of LIMITS) {
    const v = s[l.key];
    // biome-ignore lint/suspicious/noExplicitAny: the key decides number or bigint
    if (v !== undefined) (p as any)[l.key] = l.bytes ? BigInt(v) : v;
  }
  return p;
}

/** Canonical JSON of a spec, for "same spec" comparisons. */
const specKey = (s: { description: string; labels: Record<string, string>; policy: StoredPolicy }) =>
  JSON.stringify([s.description, s.labels, policyToStore(policyFromStore(s.policy))]);

const etagOf = (n: StoredNode) => `"${n.createTimeMs.toString(36)}-${n.generation}"`;

const REQUEST_ID = /^[A-Za-z0-9._:-]{1,128}$/;
const TOKEN_PREFIX = "n1:";

/**
 * The resource tree. CRUD for the RPC layer (each its own transaction), and `charge`/`release`/
 * `effectivePolicy`/`usage` for the code that places VMs (inside the caller's transaction, so that the
 * tree's usage moves in the same atomic batch as the VM's record).
 */
export class ResourceTree {
  readonly #store: Store;
  readonly #clock: Clock;

  /** @param store the coordinator's store; @param clock the source of create/update times. */
  constructor(store: Store, clock: Clock) {
    this.#store = store;
    this.#clock = clock;
  }

  // ---- used by placement and environments --------------------------------------------------------

  /**
   * Adds `delta` (one VM, a reservation …) at `path`, inside the caller's transaction `tx`. First the
   * dynamic rule: the delta must fit the set limits of the node and of every ancestor, each counting the
   * usage of its whole subtree; then `delta` is added to `usage/{p}` of every node on the path.
   *
   * @throws VmenvError RESOURCE_EXHAUSTED `QUOTA_EXCEEDED` naming the highest node that would overrun,
   *   with metadata `node` (`nodes/acme`), `resource` (`max_vcpus`), `limit`, `used`, `requested`;
   *   NOT_FOUND `NODE_NOT_FOUND` when the node does not exist; nothing is written then.
   */
  async charge(tx: Txn, path: string, delta: Usage): Promise<void> {
    checkDelta(delta);
    const chain = await this.#chargeChain(tx, path);
    checkCharge(chain, delta);
    for (const c of chain) tx.put(keys.usage(c.path), usageToStore(addUsage(c.usage, delta)));
  }

  /**
   * Subtracts `delta` at `path` and every ancestor, inside the caller's transaction; a figure never
   * goes below zero. Usage records of nodes that no longer exist are left alone (there is nothing to
   * release there), so a release during a rollback does not fail for a missing node.
   */
  async release(tx: Txn, path: string, delta: Usage): Promise<void> {
    checkDelta(delta);
    checkPath(path, "node");
    for (const p of pathChain(path)) {
      const cur = await tx.get<StoredUsage>(keys.usage(p));
      if (!cur) continue;
      const next = subUsage(usageFromStore(cur), delta);
      if (isZeroUsage(next)) tx.del(keys.usage(p));
      else tx.put(keys.usage(p), usageToStore(next));
    }
  }

  /**
   * The allowed lists along the path, for placement: networks and CPUs are the intersection of the
   * lists set along the path (undefined where no node restricts them), host labels the union of the
   * pairs. @throws NOT_FOUND `NODE_NOT_FOUND`.
   */
  async effectivePolicy(reader: StoreReader, path: string): Promise<EffectivePolicy> {
    const chain = await this.#policyChain(reader, path);
    return effectiveOf(chain);
  }

  /** Usage of the node's whole subtree. @throws NOT_FOUND `NODE_NOT_FOUND`. */
  async usage(reader: StoreReader, path: string): Promise<Usage> {
    checkPath(path, "node");
    if (!(await reader.get(keys.node(path)))) throw notFound("node", nodeName(path));
    return usageFromStore(await reader.get<StoredUsage>(keys.usage(path)));
  }

  // ---- CRUD for the RPC layer ----------------------------------------------------------------------

  /**
   * Creates `{parent}/{id}` (`parent` "" for a top-level node). Its policy must fit its ancestors'
   * (FAILED_PRECONDITION `POLICY_EXCEEDS_PARENT`). An existing node with the same spec is returned
   * unchanged; with a different one: ALREADY_EXISTS `NODE_ALREADY_EXISTS`.
   */
  async createNode(
    parent: string,
    id: string,
    spec: NodeSpec,
    opts: MutationOptions = {},
  ): Promise<TreeNode> {
    if (parent) checkPath(parent, "parent");
    checkSegment(id, "node_id");
    const path = parent ? `${parent}/${id}` : id;
    checkPath(path, "node_id");
    const norm = naming(path, () => normaliseSpec(spec, "node"));
    checkRequestId(opts.requestId);
    return this.#store.transact(async (tx) => {
      const replayed = await this.#replay(tx, opts.requestId, "create", path);
      if (replayed !== undefined) return replayed as TreeNode;
      const ancestors = parent ? await this.#policyChain(tx, parent) : [];
      const existing = await tx.get<StoredNode>(keys.node(path));
      let node: StoredNode;
      if (existing) {
        if (specKey(existing) !== specKey({ ...norm, policy: policyToStore(norm.policy) }))
          throw alreadyExists("node", nodeName(path));
        node = existing;
      } else {
        checkFitsAncestors(path, norm.policy, ancestors);
        const now = this.#clock.now();
        node = {
          description: norm.description,
          labels: norm.labels,
          policy: policyToStore(norm.policy),
          createTimeMs: now,
          updateTimeMs: now,
          generation: 1,
        };
      }
      const usage = await tx.get<StoredUsage>(keys.usage(path));
      if (!opts.validateOnly) {
        if (!existing) tx.put(keys.node(path), node);
        this.#remember(tx, opts.requestId, "create", path, node, usage);
      }
      return view(path, node, usage);
    });
  }

  /** One node with its subtree usage. @throws NOT_FOUND `NODE_NOT_FOUND`. */
  async getNode(path: string): Promise<TreeNode> {
    checkPath(path, "name");
    return this.#store.transact(async (tx) => {
      const n = await tx.get<StoredNode>(keys.node(path));
      if (!n) throw notFound("node", nodeName(path));
      return view(path, n, await tx.get<StoredUsage>(keys.usage(path)));
    });
  }

  /**
   * The children of `parent` ("" for the top level), or its whole subtree with `recursive` (the parent
   * itself excluded), in tree order: a node, then its subtree, then its next sibling. Pages of
   * `pageSize` (0: 100, at most 1000); `pageToken` is a previous page's `nextPageToken`.
   */
  async listNodes(
    parent: string,
    opts: { recursive?: boolean; pageSize?: number; pageToken?: string } = {},
  ): Promise<{ nodes: TreeNode[]; nextPageToken: string }> {
    if (parent) checkPath(parent, "parent");
    const pageSize = opts.pageSize ?? 0;
    if (!Number.isInteger(pageSize) || pageSize < 0)
      throw invalidArgument("page_size", "must not be negative");
    const size = pageSize > 0 ? Math.min(pageSize, 1000) : 100;
    let after = "";
    if (opts.pageToken) {
      const raw = Buffer.from(opts.pageToken, "base64url").toString();
      if (!raw.startsWith(TOKEN_PREFIX))
        throw invalidArgument("page_token", "is not a token ListNodes gave", "INVALID_PAGE_TOKEN");
      after = raw.slice(TOKEN_PREFIX.length);
    }
    return this.#store.transact(async (tx) => {
      if (parent && !(await tx.get(keys.node(parent)))) throw notFound("node", nodeName(parent));
      const under = parent ? `${parent}/` : "";
      const depth = parent ? depthOf(parent) + 1 : 1;
      const rows = (await tx.list<StoredNode>(`${keys.nodePrefix}${under}`))
        .map(([k, n]) => [k.slice(keys.nodePrefix.length), n] as const)
        .filter(([p]) => opts.recursive || depthOf(p) === depth)
        .map(([p, n]) => ({ p, n, key: treeOrderKey(p) }))
        .filter((r) => r.key > after)
        .sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
      const items = rows.slice(0, size);
      const usages = new Map(
        (await tx.list<StoredUsage>(keys.usage(under))).map(([k, u]) => [k.slice("usage/".length), u]),
      );
      const last = items[items.length - 1];
      return {
        nodes: items.map((r) => view(r.p, r.n, usages.get(r.p))),
        nextPageToken:
          rows.length > size && last ? Buffer.from(TOKEN_PREFIX + last.key).toString("base64url") : "",
      };
    });
  }

  /**
   * Changes description, labels and/or policy fields (`patch`). `etag`, when given, must be the node's
   * current one (ABORTED `ETAG_MISMATCH`). A new policy must fit the ancestors' (POLICY_EXCEEDS_PARENT),
   * still cover every descendant's policy (POLICY_BELOW_CHILD) and the usage under the node
   * (POLICY_BELOW_USAGE), all FAILED_PRECONDITION naming the node and the field.
   */
  async updateNode(
    path: string,
    patch: NodePatch,
    opts: MutationOptions & { etag?: string } = {},
  ): Promise<TreeNode> {
    checkPath(path, "node.name");
    checkRequestId(opts.requestId);
    if (patch.description !== undefined)
      naming(path, () => checkDescription(patch.description as string, "node.description"));
    const labels = patch.labels
      ? naming(path, () => normaliseLabels(patch.labels as Record<string, string>, "node.labels"))
      : undefined;
    return this.#store.transact(async (tx) => {
      const replayed = await this.#replay(tx, opts.requestId, "update", path);
      if (replayed !== undefined) return replayed as TreeNode;
      const cur = await tx.get<StoredNode>(keys.node(path));
      if (!cur) throw notFound("node", nodeName(path));
      checkEtag(path, cur, opts.etag);
      const curPolicy = policyFromStore(cur.policy);
      let policy = curPolicy;
      if (patch.policy) {
        const merged: Policy = { ...curPolicy };
        for (const [k, v] of Object.entries(patch.policy) as Array<[keyof Policy, unknown]>) {
          if (!Object.hasOwn(patch.policy, k)) continue;
          if (k === "allowedNetworks" || k === "allowedCpus") merged[k] = (v as never[] | undefined) ?? [];
          else if (k === "allowedHostLabels") merged[k] = (v as Record<string, string> | undefined) ?? {};
          // biome-ignore lint/suspicious/noExplicitAny: a limit (number or bigint) or undefined
          else if (v === undefined) delete (merged as any)[k];
          // biome-ignore lint/suspicious/noExplicitAny: a limit (number or bigint)
          else (merged as any)[k] = v;
        }
        policy = naming(path, () => normalisePolicy(merged, "node.policy"));
      }
      const next: StoredNode = {
        ...cur,
        description: patch.description ?? cur.description,
        labels: labels ?? cur.labels,
        policy: policyToStore(policy),
      };
      const usage = await tx.get<StoredUsage>(keys.usage(path));
      if (JSON.stringify(next.policy) !== JSON.stringify(cur.policy)) {
        const ancestors = path.includes("/") ? await this.#policyChain(tx, parentOf(path)) : [];
        checkFitsAncestors(path, policy, ancestors);
        checkCoversUsage(path, policy, usageFromStore(usage));
        const descendants = new Map<string, Policy>(
          (await tx.list<StoredNode>(keys.node(`${path}/`))).map(([k, n]) => [
            k.slice(keys.nodePrefix.length),
            policyFromStore(n.policy),
          ]),
        );
        const policyAt = (p: string): Policy =>
          p === path
            ? policy
            : (descendants.get(p) ?? ancestors.find((a) => a.path === p)?.policy ?? emptyPolicy());
        const ordered = [...descendants.keys()].sort((a, b) => depthOf(a) - depthOf(b));
        for (const d of ordered) {
          const chain = pathChain(d)
            .slice(0, -1)
            .map((p) => ({ path: p, policy: policyAt(p) }));
          checkCoversDescendant(path, { path: d, policy: policyAt(d) }, chain);
        }
      }
      const changed = specKey(next) !== specKey(cur);
      const written: StoredNode = changed
        ? { ...next, updateTimeMs: this.#clock.now(), generation: cur.generation + 1 }
        : cur;
      if (!opts.validateOnly) {
        if (changed) tx.put(keys.node(path), written);
        this.#remember(tx, opts.requestId, "update", path, written, usage);
      }
      return view(path, written, usage);
    });
  }

  /**
   * Deletes a node that has no children, no usage and no environments (FAILED_PRECONDITION
   * `NODE_HAS_CHILDREN`, `NODE_IN_USE`, `NODE_HAS_ENVIRONMENTS` otherwise). `etag`, when given, must be
   * current (ABORTED `ETAG_MISMATCH`); `allowMissing` makes a missing node a success.
   */
  async deleteNode(
    path: string,
    opts: MutationOptions & { etag?: string; allowMissing?: boolean } = {},
  ): Promise<void> {
    checkPath(path, "name");
    checkRequestId(opts.requestId);
    await this.#store.transact(async (tx) => {
      if ((await this.#replay(tx, opts.requestId, "delete", path)) !== undefined) return;
      const cur = await tx.get<StoredNode>(keys.node(path));
      if (!cur) {
        if (!opts.allowMissing) throw notFound("node", nodeName(path));
        if (!opts.validateOnly) this.#remember(tx, opts.requestId, "delete", path);
        return;
      }
      checkEtag(path, cur, opts.etag);
      const [child] = await tx.list(keys.node(`${path}/`), { limit: 1 });
      if (child)
        throw new VmenvError(
          "failed-precondition",
          `${nodeName(path)} has children (${nodeName(child[0].slice(keys.nodePrefix.length))}); delete them first`,
          {
            reason: "NODE_HAS_CHILDREN",
            metadata: { node: nodeName(path), child: nodeName(child[0].slice(keys.nodePrefix.length)) },
          },
        );
      const usage = usageFromStore(await tx.get<StoredUsage>(keys.usage(path)));
      if (!isZeroUsage(usage))
        throw new VmenvError(
          "failed-precondition",
          `${nodeName(path)} is in use (${usage.vms} VMs, ${usage.vcpus} vCPUs, ${usage.memoryBytes} bytes of memory); destroy its environments first`,
          {
            reason: "NODE_IN_USE",
            metadata: { node: nodeName(path), vms: String(usage.vms), vcpus: String(usage.vcpus) },
          },
        );
      for (const [k, env] of await tx.list<JsonValue>(keys.envPrefix)) {
        if (env && typeof env === "object" && !Array.isArray(env) && env.node === path) {
          const environment = `environments/${k.slice(keys.envPrefix.length)}`;
          throw new VmenvError(
            "failed-precondition",
            `${nodeName(path)} holds ${environment}; delete it first`,
            { reason: "NODE_HAS_ENVIRONMENTS", metadata: { node: nodeName(path), environment } },
          );
        }
      }
      if (opts.validateOnly) return;
      tx.del(keys.node(path));
      tx.del(keys.usage(path));
      this.#remember(tx, opts.requestId, "delete", path);
    });
  }

  // ---- internals ------------------------------------------------------------------------------------

  /** Policies root first along `path`; NODE_NOT_FOUND naming `path` when any node is missing. */
  async #policyChain(r: StoreReader, path: string): Promise<PolicyAt[]> {
    checkPath(path, "node");
    const recs = await Promise.all(pathChain(path).map((p) => r.get<StoredNode>(keys.node(p))));
    return pathChain(path).map((p, i) => {
      const n = recs[i];
      if (!n) throw notFound("node", nodeName(path));
      return { path: p, policy: policyFromStore(n.policy) };
    });
  }

  async #chargeChain(r: StoreReader, path: string): Promise<ChargeAt[]> {
    const chain = await this.#policyChain(r, path);
    const usages = await Promise.all(chain.map((c) => r.get<StoredUsage>(keys.usage(c.path))));
    return chain.map((c, i) => ({ ...c, usage: usageFromStore(usages[i]) }));
  }

  /** The first result of a request id seen before (null for a delete), or undefined. */
  async #replay(
    tx: Txn,
    requestId: string | undefined,
    method: StoredRequest["method"],
    path: string,
  ): Promise<TreeNode | null | undefined> {
    if (!requestId) return undefined;
    const r = await tx.get<StoredRequest>(keys.nodeRequest(requestId));
    if (!r) return undefined;
    if (r.method !== method || r.node !== path)
      throw invalidArgument(
        "request_id",
        `${requestId} was used for a ${r.method} of ${nodeName(r.node)}; use a new request id`,
        "REQUEST_ID_REUSED",
      );
    return r.result ? view(path, r.result.node, r.result.usage) : null;
  }

  #remember(
    tx: Txn,
    requestId: string | undefined,
    method: StoredRequest["method"],
    path: string,
    node?: StoredNode,
    usage?: StoredUsage,
  ): void {
    if (!requestId) return;
    const rec: StoredRequest = {
      method,
      node: path,
      result: node ? { node, usage: usage ?? usageToStore(usageFromStore(undefined)) } : null,
      timeMs: this.#clock.now(),
    };
    tx.put(keys.nodeRequest(requestId), rec);
  }
}

function view(path: string, n: StoredNode, u: StoredUsage | undefined): TreeNode {
  return {
    path,
    description: n.description,
    labels: { ...n.labels },
    policy: policyFromStore(n.policy),
    usage: usageFromStore(u),
    createTimeMs: n.createTimeMs,
    updateTimeMs: n.updateTimeMs,
    etag: etagOf(n),
  };
}

/** Runs a request check, adding the node's name to the message and metadata of its refusal. */
function naming<T>(path: string, check: () => T): T {
  try {
    return check();
  } catch (e) {
    if (!(e instanceof VmenvError)) throw e;
    throw new VmenvError(e.code, `${nodeName(path)}: ${e.message}`, {
      reason: e.reason,
      metadata: { ...e.metadata, node: nodeName(path) },
      fieldViolations: [...e.fieldViolations],
    });
  }
}

function checkEtag(path: string, n: StoredNode, etag: string | undefined): void {
  if (etag && etag !== etagOf(n))
    throw new VmenvError(
      "aborted",
      `${nodeName(path)} changed since etag ${etag.slice(0, 40)} (now ${etagOf(n)}); read it again`,
      { reason: "ETAG_MISMATCH", metadata: { node: nodeName(path), etag: etagOf(n) } },
    );
}

function checkRequestId(id: string | undefined): void {
  if (id && !REQUEST_ID.test(id))
    throw invalidArgument(
      "request_id",
      "use 1-128 letters, digits, '.', '_', ':' or '-' (a UUID is recommended)",
      "INVALID_REQUEST_ID",
    );
}
