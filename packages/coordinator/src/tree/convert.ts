import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import {
  type Node,
  NodeSchema,
  type Policy as PbPolicy,
  type Usage as PbUsage,
  PolicySchema,
  UsageSchema,
} from "@vmenv/api/coordinator/v1";
import type { Usage } from "../domain/usage.js";
import { LIMITS, type NodeSpec, nodeName, type Policy, parentOf } from "./domain.js";
import type { TreeNode } from "./tree.js";

/** The API's Policy → the domain's (an absent policy sets nothing). */
export function fromPbPolicy(p: PbPolicy | undefined): Policy {
  const out: Policy = {
    allowedNetworks: [...(p?.allowedNetworks ?? [])],
    allowedHostLabels: { ...(p?.allowedHostLabels ?? {}) },
    allowedCpus: [...(p?.allowedCpus ?? [])],
  };
  for (const l of LIMITS) {
    const v = p?.[l.key];
    // biome-ignore lint/suspicious/noExplicitAny: the key decides number or bigint
    if (v !== undefined) (out as any)[l.key] = v;
  }
  return out;
}

export function toPbPolicy(p: Policy): PbPolicy {
  return create(PolicySchema, {
    ...Object.fromEntries(LIMITS.filter((l) => p[l.key] !== undefined).map((l) => [l.key, p[l.key]])),
    allowedNetworks: p.allowedNetworks,
    allowedHostLabels: p.allowedHostLabels,
    allowedCpus: p.allowedCpus,
  });
}

export function toPbUsage(u: Usage): PbUsage {
  return create(UsageSchema, { ...u });
}

/** The settable part of an API Node. */
export function fromPbSpec(n: Node): NodeSpec {
  return { description: n.description, labels: { ...n.labels }, policy: fromPbPolicy(n.policy) };
}

export function toPbNode(n: TreeNode): Node {
  const parent = parentOf(n.path);
  return create(NodeSchema, {
    name: nodeName(n.path),
    parent: parent ? nodeName(parent) : "",
    description: n.description,
    labels: n.labels,
    policy: toPbPolicy(n.policy),
    usage: toPbUsage(n.usage),
    createTime: timestampFromMs(n.createTimeMs),
    updateTime: timestampFromMs(n.updateTimeMs),
    etag: n.etag,
  });
}
