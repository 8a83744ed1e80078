import { ResourceService } from "@vmenv/api/coordinator/v1";
import { bind, invalidArgument, noFilter, type ServiceBinding } from "@vmenv/rpc";
import { fromPbPolicy, fromPbSpec, toPbNode } from "./convert.js";
import { LIMITS, type Policy, pathFromName } from "./domain.js";
import type { NodePatch, ResourceTree } from "./tree.js";

/** Fields of Node that UpdateNode may change (update_mask paths), besides `policy.<field>`. */
const SETTABLE = ["description", "labels", "policy"] as const;
/** Output-only (or identifying) fields of Node: naming one in an update_mask is refused. */
const OUTPUT_ONLY = new Set(["name", "parent", "usage", "create_time", "update_time", "etag"]);
const POLICY_FIELDS: Record<string, keyof Policy> = {
  ...Object.fromEntries(LIMITS.map((l) => [l.field, l.key])),
  allowed_networks: "allowedNetworks",
  allowed_host_labels: "allowedHostLabels",
  allowed_cpus: "allowedCpus",
};

/** An update_mask → the patch it asks for, with values taken from `node` (unset: cleared). */
export function patchFromMask(
  paths: readonly string[],
  node: { description: string; labels: Record<string, string>; policy?: Parameters<typeof fromPbPolicy>[0] },
): NodePatch {
  if (paths.length === 0)
    throw invalidArgument(
      "update_mask",
      'name the fields to change: "description", "labels", "policy" or "policy.<field>" (e.g. "policy.max_vcpus")',
    );
  const patch: NodePatch = {};
  const full = fromPbPolicy(node.policy);
  for (const raw of paths) {
    const p = raw.trim();
    const top = p.split(".")[0] ?? "";
    if (p === "*") {
      patch.description = node.description;
      patch.labels = { ...node.labels };
      patch.policy = wholePolicy(full);
    } else if (p === "description") patch.description = node.description;
    else if (p === "labels") patch.labels = { ...node.labels };
    else if (p === "policy") patch.policy = wholePolicy(full);
    else if (p.startsWith("policy.") && POLICY_FIELDS[p.slice("policy.".length)]) {
      const key = POLICY_FIELDS[p.slice("policy.".length)] as keyof Policy;
      patch.policy ??= {};
      // biome-ignore lint/suspicious/noExplicitAny: one policy field, present (possibly undefined = clear)
      (patch.policy as any)[key] = full[key];
    } else if (OUTPUT_ONLY.has(top))
      throw invalidArgument(
        "update_mask",
        `"${p}" is output only and cannot be changed`,
        "FIELD_NOT_UPDATABLE",
      );
    else
      throw invalidArgument(
        "update_mask",
        `"${p.slice(0, 80)}" is not a field of Node that can be changed (${SETTABLE.join(", ")}, policy.<field>)`,
        "UNKNOWN_FIELD",
      );
  }
  return patch;
}

/** Every policy field present, so that unset limits are cleared. */
function wholePolicy(p: Policy): Partial<Policy> {
  const w: Partial<Policy> = { ...p };
  for (const l of LIMITS) if (!Object.hasOwn(w, l.key)) w[l.key] = undefined;
  return w;
}

/** ResourceService: check, convert, call the tree, convert back. */
export function resourceService(tree: ResourceTree): ServiceBinding {
  return bind(ResourceService, {
    async createNode(req) {
      const parent = pathFromName(req.parent, "parent", true);
      if (!req.node) throw invalidArgument("node", "is required");
      const want = `nodes/${parent ? `${parent}/` : ""}${req.nodeId}`;
      if (req.node.name && req.node.name !== want)
        throw invalidArgument(
          "node.name",
          `"${req.node.name.slice(0, 120)}" does not match parent and node_id (${want.slice(0, 120)}); leave it empty`,
        );
      const node = await tree.createNode(parent, req.nodeId, fromPbSpec(req.node), {
        validateOnly: req.validateOnly,
        ...(req.requestId ? { requestId: req.requestId } : {}),
      });
      return toPbNode(node);
    },
    async getNode(req) {
      return toPbNode(await tree.getNode(pathFromName(req.name, "name")));
    },
    async listNodes(req) {
      noFilter(req.filter, "list a subtree with parent and recursive");
      const r = await tree.listNodes(pathFromName(req.parent, "parent", true), {
        recursive: req.recursive,
        pageSize: req.pageSize,
        pageToken: req.pageToken,
      });
      return { nodes: r.nodes.map(toPbNode), nextPageToken: r.nextPageToken };
    },
    async updateNode(req) {
      if (!req.node) throw invalidArgument("node", "is required");
      const path = pathFromName(req.node.name, "node.name");
      const patch = patchFromMask(req.updateMask?.paths ?? [], req.node);
      return toPbNode(
        await tree.updateNode(path, patch, {
          validateOnly: req.validateOnly,
          ...(req.node.etag ? { etag: req.node.etag } : {}),
          ...(req.requestId ? { requestId: req.requestId } : {}),
        }),
      );
    },
    async deleteNode(req) {
      await tree.deleteNode(pathFromName(req.name, "name"), {
        allowMissing: req.allowMissing,
        ...(req.etag ? { etag: req.etag } : {}),
        ...(req.requestId ? { requestId: req.requestId } : {}),
      });
      return {};
    },
  });
}
