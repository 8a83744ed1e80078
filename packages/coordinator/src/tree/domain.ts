/**
 * The resource tree's domain: node paths and names, policies, and the two rules (seed 004, made
 * stricter). Plain TypeScript, no I/O: the store-backed tree (tree.ts) reads records, calls these
 * checks, and writes.
 *
 * - Static rule (`checkFitsAncestors`, `checkCoversDescendant`, `checkCoversUsage`): a node's set limits
 *   never exceed the effective limit of any ancestor, its allowed lists only narrow its ancestors', and a
 *   policy change still covers the usage already under the node.
 * - Dynamic rule (`checkCharge`): adding usage at a path must fit the policy of the node and of every
 *   ancestor, each counting the usage of its whole subtree. Siblings whose delegations sum to more than
 *   their parent are allowed statically, and refused at the moment their sum would overrun the parent.
 */
import { invalidArgument, VmenvError } from "@vmenv/rpc/errors";
import type { Usage } from "../domain/usage.js";

// ---- paths and names ----------------------------------------------------------------------------

/** Most segments in a path (`a/b/…`). */
export const MAX_DEPTH = 16;
const SEGMENT = /^[a-z0-9][a-z0-9-]{0,62}$/;
const SEGMENT_RULE = "1-63 lower-case letters, digits and '-', starting with a letter or digit";

/** `acme/web` → `nodes/acme/web`. */
export const nodeName = (path: string): string => `nodes/${path}`;

/** Checks one path segment (a node id). */
export function checkSegment(id: string, field: string): void {
  if (!SEGMENT.test(id))
    throw invalidArgument(
      field,
      `"${id.slice(0, 80)}" is not a valid node id: use ${SEGMENT_RULE}`,
      "INVALID_NODE_ID",
    );
}

/** Checks a bare path (`acme/web/prod`): 1 to 16 valid segments. */
export function checkPath(path: string, field: string): void {
  const segs = path.split("/");
  const bad = segs.find((s) => !SEGMENT.test(s));
  if (path === "" || bad !== undefined)
    throw invalidArgument(
      field,
      `"${path.slice(0, 120)}" is not a valid node path: each segment (between '/') has ${SEGMENT_RULE}` +
        (bad === "" ? " (no empty segment)" : bad ? ` ("${bad.slice(0, 80)}" does not)` : ""),
      "INVALID_NODE_NAME",
    );
  if (segs.length > MAX_DEPTH)
    throw invalidArgument(
      field,
      `nodes/${path.slice(0, 120)} has ${segs.length} levels; a path has at most ${MAX_DEPTH}`,
      "NODE_TOO_DEEP",
    );
}

/** `nodes/acme/web` → `acme/web`; `emptyOk` maps "" to "" (the top of the tree). */
export function pathFromName(name: string, field: string, emptyOk = false): string {
  if (name === "" && emptyOk) return "";
  if (!name.startsWith("nodes/"))
    throw invalidArgument(
      field,
      `"${name.slice(0, 120)}" is not a node name (nodes/{path}, e.g. nodes/acme/web)`,
      "INVALID_NODE_NAME",
    );
  const path = name.slice("nodes/".length);
  checkPath(path, field);
  return path;
}

/** `acme/web/prod` → `acme/web`; a top-level node → "". */
export function parentOf(path: string): string {
  const i = path.lastIndexOf("/");
  return i < 0 ? "" : path.slice(0, i);
}

/** `acme/web/prod` → [`acme`, `acme/web`, `acme/web/prod`] (root first, the path itself last). */
export function pathChain(path: string): string[] {
  const segs = path.split("/");
  return segs.map((_, i) => segs.slice(0, i + 1).join("/"));
}

/** Number of segments. */
export const depthOf = (path: string): number => path.split("/").length;

/**
 * A key that sorts paths in tree order (a parent, then its whole subtree, then its next sibling): `/`
 * becomes U+0001, below every segment character, so `acme/web` sorts before `acme-x`.
 */
export const treeOrderKey = (path: string): string => path.replaceAll("/", "\u0001");

// ---- policies -----------------------------------------------------------------------------------

/** What may run at or under a node. A limit left undefined sets no bound of its own; 0 allows none. */
export interface Policy {
  maxVms?: number;
  maxVcpus?: number;
  maxMemoryBytes?: bigint;
  maxBlockBytes?: bigint;
  maxGpus?: number;
  maxGpuMemoryBytes?: bigint;
  /** `networks/{network}` names, sorted, no duplicates; empty: no restriction of its own. */
  allowedNetworks: string[];
  /** Agents must carry every pair. */
  allowedHostLabels: Record<string, string>;
  /** Host logical CPUs, sorted, no duplicates; empty: no restriction of its own. */
  allowedCpus: number[];
}

export type LimitKey =
  | "maxVms"
  | "maxVcpus"
  | "maxMemoryBytes"
  | "maxBlockBytes"
  | "maxGpus"
  | "maxGpuMemoryBytes";

/** One bounded resource: the policy field, its API name, and the usage figure it bounds. */
export interface Limit {
  key: LimitKey;
  /** API field name within Policy, e.g. `max_vcpus`. */
  field: string;
  usage: keyof Usage;
  bytes: boolean;
}

export const LIMITS: readonly Limit[] = [
  { key: "maxVms", field: "max_vms", usage: "vms", bytes: false },
  { key: "maxVcpus", field: "max_vcpus", usage: "vcpus", bytes: false },
  { key: "maxMemoryBytes", field: "max_memory_bytes", usage: "memoryBytes", bytes: true },
  { key: "maxBlockBytes", field: "max_block_bytes", usage: "blockBytes", bytes: true },
  { key: "maxGpus", field: "max_gpus", usage: "gpus", bytes: false },
  { key: "maxGpuMemoryBytes", field: "max_gpu_memory_bytes", usage: "gpuMemoryBytes", bytes: true },
];

/** Largest count limit (VMs, vCPUs, GPUs) a policy may set: above it, a limit is a typo, not a bound. */
export const MAX_COUNT_LIMIT = 1_000_000_000;
/** Largest byte limit (memory, block, GPU memory) a policy may set: 1 EiB. */
export const MAX_BYTES_LIMIT = 1n << 60n;
/** Highest host CPU number an allowed CPU set may name (Linux's largest NR_CPUS is 8192). */
export const MAX_CPU = 8191;

const NETWORK_NAME = /^networks\/[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/;
const LABEL_KEY = /^[A-Za-z0-9]([A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?$/;

export const emptyPolicy = (): Policy => ({ allowedNetworks: [], allowedHostLabels: {}, allowedCpus: [] });

/** A policy's limit as a bigint (undefined when unset). */
export function limitOf(p: Policy, key: LimitKey): bigint | undefined {
  const v = p[key];
  return v === undefined ? undefined : BigInt(v);
}

/**
 * Checks and normalises a policy from a request (`field` is its path, e.g. `node.policy`): limits within
 * range, network names well formed, CPUs in range; lists sorted and deduplicated.
 */
export function normalisePolicy(p: Policy, field: string): Policy {
  const out: Policy = emptyPolicy();
  for (const l of LIMITS) {
    const v = limitOf(p, l.key);
    if (v === undefined) continue;
    const max = l.bytes ? MAX_BYTES_LIMIT : BigInt(MAX_COUNT_LIMIT);
    if (v < 0n || v > max)
      throw invalidArgument(
        `${field}.${l.field}`,
        `${v} is out of range: a limit is between 0 (none allowed) and ${max}; leave it unset for no bound of its own`,
        "INVALID_POLICY",
      );
    // biome-ignore lint/suspicious/noExplicitAny: the key decides number or bigint
    (out as any)[l.key] = l.bytes ? v : Number(v);
  }
  for (const n of p.allowedNetworks) {
    if (!NETWORK_NAME.test(n))
      throw invalidArgument(
        `${field}.allowed_networks`,
        `"${n.slice(0, 80)}" is not a network name (networks/{network})`,
        "INVALID_POLICY",
      );
  }
  out.allowedNetworks = [...new Set(p.allowedNetworks)].sort();
  for (const c of p.allowedCpus) {
    if (!Number.isInteger(c) || c < 0 || c > MAX_CPU)
      throw invalidArgument(
        `${field}.allowed_cpus`,
        `CPU ${c} is out of range (0 to ${MAX_CPU})`,
        "INVALID_POLICY",
      );
  }
  out.allowedCpus = [...new Set(p.allowedCpus)].sort((a, b) => a - b);
  for (const [k, v] of Object.entries(p.allowedHostLabels)) {
    if (!LABEL_KEY.test(k))
      throw invalidArgument(
        `${field}.allowed_host_labels`,
        `"${k.slice(0, 80)}" is not a label key (1-128 letters, digits, '.', '_', '-', '/')`,
        "INVALID_POLICY",
      );
    if (v.length > 256)
      throw invalidArgument(
        `${field}.allowed_host_labels`,
        `the value of "${k}" is longer than 256 characters`,
        "INVALID_POLICY",
      );
  }
  out.allowedHostLabels = sortedRecord(p.allowedHostLabels);
  return out;
}

export function sortedRecord(r: Record<string, string>): Record<string, string> {
  return Object.fromEntries(Object.entries(r).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** One ancestor (or the node itself) with its policy, root first in every chain. */
export interface PolicyAt {
  path: string;
  policy: Policy;
}

/** The effective allowed lists along a chain (root first), for placement. */
export interface EffectivePolicy {
  /** Networks VMs may join; undefined: no node on the path restricts them. */
  allowedNetworks?: string[];
  /** Labels an agent must carry: the union of the pairs along the path. */
  allowedHostLabels: Record<string, string>;
  /** Host CPUs VMs may run on; undefined: no node on the path restricts them. */
  allowedCpus?: number[];
}

/** Intersection of the allowed lists and union of the host labels along `chain`. */
export function effectiveOf(chain: readonly PolicyAt[]): EffectivePolicy {
  let nets: Set<string> | undefined;
  let cpus: Set<number> | undefined;
  const labels: Record<string, string> = {};
  for (const { policy } of chain) {
    if (policy.allowedNetworks.length > 0)
      nets = new Set(policy.allowedNetworks.filter((n) => nets === undefined || nets.has(n)));
    if (policy.allowedCpus.length > 0)
      cpus = new Set(policy.allowedCpus.filter((c) => cpus === undefined || cpus.has(c)));
    Object.assign(labels, policy.allowedHostLabels);
  }
  return {
    ...(nets ? { allowedNetworks: [...nets].sort() } : {}),
    allowedHostLabels: sortedRecord(labels),
    ...(cpus ? { allowedCpus: [...cpus].sort((a, b) => a - b) } : {}),
  };
}

/** The tightest set limit along a chain and the node that sets it. */
export function effectiveLimit(
  chain: readonly PolicyAt[],
  key: LimitKey,
): { limit: bigint; path: string } | undefined {
  let best: { limit: bigint; path: string } | undefined;
  for (const { path, policy } of chain) {
    const v = limitOf(policy, key);
    if (v !== undefined && (best === undefined || v < best.limit)) best = { limit: v, path };
  }
  return best;
}

/**
 * Static rule for a node's policy against its ancestors (`ancestors` root first, the node excluded):
 * every set limit ≤ each ancestor's; allowed networks and CPUs within the ancestors' (where they restrict
 * them); host labels not contradicting theirs. Refusal: FAILED_PRECONDITION POLICY_EXCEEDS_PARENT
 * naming the node, the field and the (highest) ancestor it exceeds.
 */
export function checkFitsAncestors(path: string, policy: Policy, ancestors: readonly PolicyAt[]): void {
  const refuse = (field: string, anc: string, message: string, extra: Record<string, string>) =>
    new VmenvError("failed-precondition", `${nodeName(path)}: ${message}`, {
      reason: "POLICY_EXCEEDS_PARENT",
      metadata: { node: nodeName(path), field: `policy.${field}`, parent: nodeName(anc), ...extra },
    });
  for (const l of LIMITS) {
    const v = limitOf(policy, l.key);
    if (v === undefined) continue;
    for (const a of ancestors) {
      const lim = limitOf(a.policy, l.key);
      if (lim !== undefined && v > lim)
        throw refuse(l.field, a.path, `policy.${l.field} ${v} exceeds ${lim} of ${nodeName(a.path)}`, {
          limit: String(lim),
          requested: String(v),
        });
    }
  }
  for (let i = 0; i < ancestors.length; i++) {
    const a = ancestors[i] as PolicyAt;
    const eff = effectiveOf(ancestors.slice(0, i + 1));
    if (policy.allowedNetworks.length > 0 && a.policy.allowedNetworks.length > 0) {
      const out = policy.allowedNetworks.find((n) => !eff.allowedNetworks?.includes(n));
      if (out)
        throw refuse(
          "allowed_networks",
          a.path,
          `policy.allowed_networks names ${out}, which ${nodeName(a.path)} does not allow`,
          { network: out },
        );
    }
    if (policy.allowedCpus.length > 0 && a.policy.allowedCpus.length > 0) {
      const out = policy.allowedCpus.find((c) => !eff.allowedCpus?.includes(c));
      if (out !== undefined)
        throw refuse(
          "allowed_cpus",
          a.path,
          `policy.allowed_cpus names CPU ${out}, which ${nodeName(a.path)} does not allow`,
          { cpu: String(out) },
        );
    }
    for (const [k, v] of Object.entries(a.policy.allowedHostLabels)) {
      const mine = policy.allowedHostLabels[k];
      if (mine !== undefined && mine !== v)
        throw refuse(
          "allowed_host_labels",
          a.path,
          `policy.allowed_host_labels ${k}=${mine} contradicts ${k}=${v} of ${nodeName(a.path)}`,
          { label: k },
        );
    }
  }
}

/**
 * Static rule downwards: after `path`'s policy changes to `policy`, a descendant's own policy must still
 * fit (`chainOfDescendant`: the descendant's ancestors root first with the new policy in place, the
 * descendant excluded). Refusal: FAILED_PRECONDITION POLICY_BELOW_CHILD naming both nodes.
 */
export function checkCoversDescendant(
  path: string,
  descendant: PolicyAt,
  chainOfDescendant: readonly PolicyAt[],
): void {
  try {
    checkFitsAncestors(descendant.path, descendant.policy, chainOfDescendant);
  } catch (e) {
    if (!(e instanceof VmenvError)) throw e;
    const field = e.metadata.field ?? "policy";
    throw new VmenvError(
      "failed-precondition",
      `${nodeName(path)}: the new ${field} would not cover ${nodeName(descendant.path)} (${e.message.replace(/^[^:]*: /, "")})`,
      {
        reason: "POLICY_BELOW_CHILD",
        metadata: {
          node: nodeName(path),
          child: nodeName(descendant.path),
          field,
          ...(e.metadata.limit ? { limit: e.metadata.limit, childLimit: e.metadata.requested ?? "" } : {}),
          ...(e.metadata.network ? { network: e.metadata.network } : {}),
          ...(e.metadata.cpu ? { cpu: e.metadata.cpu } : {}),
          ...(e.metadata.label ? { label: e.metadata.label } : {}),
        },
      },
    );
  }
}

/**
 * Static rule against usage: every set limit of `policy` must cover `usage` (the node's subtree).
 * Refusal: FAILED_PRECONDITION POLICY_BELOW_USAGE naming the node and field with the numbers.
 */
export function checkCoversUsage(path: string, policy: Policy, usage: Usage): void {
  for (const l of LIMITS) {
    const lim = limitOf(policy, l.key);
    const used = BigInt(usage[l.usage]);
    if (lim !== undefined && used > lim)
      throw new VmenvError(
        "failed-precondition",
        `${nodeName(path)}: policy.${l.field} ${lim} is below the ${used} already in use under the node`,
        {
          reason: "POLICY_BELOW_USAGE",
          metadata: {
            node: nodeName(path),
            field: `policy.${l.field}`,
            limit: String(lim),
            used: String(used),
          },
        },
      );
  }
}

/** One node of a charge's path: its policy and the usage of its whole subtree. */
export interface ChargeAt extends PolicyAt {
  usage: Usage;
}

/**
 * Dynamic rule: `delta` added at the end of `chain` (root first) must fit every node's set limits, each
 * counting its whole subtree. Only resources the delta asks for are checked. Refusal names the highest
 * node that would overrun: RESOURCE_EXHAUSTED QUOTA_EXCEEDED with node, resource, limit, used, requested.
 */
export function checkCharge(chain: readonly ChargeAt[], delta: Usage): void {
  for (const { path, policy, usage } of chain) {
    for (const l of LIMITS) {
      const lim = limitOf(policy, l.key);
      const req = BigInt(delta[l.usage]);
      if (lim === undefined || req === 0n) continue;
      const used = BigInt(usage[l.usage]);
      if (used + req > lim)
        throw new VmenvError(
          "resource-exhausted",
          `${nodeName(path)}: ${l.field} would be exceeded: ${used} used + ${req} requested > ${lim}`,
          {
            reason: "QUOTA_EXCEEDED",
            metadata: {
              node: nodeName(path),
              resource: l.field,
              limit: String(lim),
              used: String(used),
              requested: String(req),
            },
          },
        );
    }
  }
}

/** Throws unless every figure of `u` is a non-negative integer (a delta given to charge or release). */
export function checkDelta(u: Usage): void {
  const ok =
    [u.vms, u.vcpus, u.gpus].every((n) => Number.isInteger(n) && n >= 0) &&
    [u.memoryBytes, u.blockBytes, u.gpuMemoryBytes].every((b) => typeof b === "bigint" && b >= 0n);
  if (!ok)
    throw new VmenvError("internal", "a usage delta must be made of non-negative integers", {
      reason: "INVALID_USAGE_DELTA",
    });
}

// ---- node specs ---------------------------------------------------------------------------------

/** What a caller sets on a node: compared for create idempotency. */
export interface NodeSpec {
  description: string;
  labels: Record<string, string>;
  policy: Policy;
}

/** Longest description, in characters. */
export const MAX_DESCRIPTION = 1024;

/** Checks a description (`field`: its request path). */
export function checkDescription(d: string, field: string): void {
  if (d.length > MAX_DESCRIPTION)
    throw invalidArgument(field, `is longer than ${MAX_DESCRIPTION} characters`, "INVALID_NODE");
}

/** Checks labels and returns them sorted by key (`field`: their request path). */
export function normaliseLabels(labels: Record<string, string>, field: string): Record<string, string> {
  for (const [k, v] of Object.entries(labels)) {
    if (!LABEL_KEY.test(k))
      throw invalidArgument(
        field,
        `"${k.slice(0, 80)}" is not a label key (1-128 letters, digits, '.', '_', '-', '/')`,
        "INVALID_NODE",
      );
    if (v.length > 256)
      throw invalidArgument(field, `the value of "${k}" is longer than 256 characters`, "INVALID_NODE");
  }
  return sortedRecord(labels);
}

/** Checks and normalises a whole spec (`field`: the node's request path, e.g. `node`). */
export function normaliseSpec(spec: NodeSpec, field: string): NodeSpec {
  checkDescription(spec.description, `${field}.description`);
  return {
    description: spec.description,
    labels: normaliseLabels(spec.labels, `${field}.labels`),
    policy: normalisePolicy(spec.policy, `${field}.policy`),
  };
}
