import { create, toJson } from "@bufbuild/protobuf";
import { FieldMaskSchema, timestampDate } from "@bufbuild/protobuf/wkt";
import {
  type Node,
  NodeSchema,
  type Policy,
  PolicySchema,
  ResourceService,
  type Usage,
} from "@vmenv/api/coordinator/v1";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import type { Command } from "commander";
import { bytes, cpuList, keyValues, table } from "./output.js";
import { parseSize } from "./vm.js";

type Print = (json: unknown, text: () => string) => void;

/** One limit flag: `--max-vcpus <n>` sets `policy.max_vcpus`; `--clear-max-vcpus` clears it. */
interface LimitFlag {
  flag: string;
  key: "maxVms" | "maxVcpus" | "maxMemoryBytes" | "maxBlockBytes" | "maxGpus" | "maxGpuMemoryBytes";
  field: string;
  usage: keyof Omit<Usage, "$typeName" | "$unknown">;
  bytes: boolean;
  header: string;
  label: string;
}

const LIMITS: LimitFlag[] = [
  {
    flag: "max-vms",
    key: "maxVms",
    field: "max_vms",
    usage: "vms",
    bytes: false,
    header: "VMS",
    label: "VMs",
  },
  {
    flag: "max-vcpus",
    key: "maxVcpus",
    field: "max_vcpus",
    usage: "vcpus",
    bytes: false,
    header: "VCPUS",
    label: "vCPUs",
  },
  {
    flag: "max-memory",
    key: "maxMemoryBytes",
    field: "max_memory_bytes",
    usage: "memoryBytes",
    bytes: true,
    header: "MEMORY",
    label: "Memory",
  },
  {
    flag: "max-block",
    key: "maxBlockBytes",
    field: "max_block_bytes",
    usage: "blockBytes",
    bytes: true,
    header: "BLOCK",
    label: "Block",
  },
  {
    flag: "max-gpus",
    key: "maxGpus",
    field: "max_gpus",
    usage: "gpus",
    bytes: false,
    header: "GPUS",
    label: "GPUs",
  },
  {
    flag: "max-gpu-memory",
    key: "maxGpuMemoryBytes",
    field: "max_gpu_memory_bytes",
    usage: "gpuMemoryBytes",
    bytes: true,
    header: "GPU MEMORY",
    label: "GPU memory",
  },
];

/** `acme/web` or `nodes/acme/web` → `nodes/acme/web`. */
const nodeName = (p: string) => (p.startsWith("nodes/") ? p : `nodes/${p.replace(/^\/+/, "")}`);

function count(flag: string, raw: string): number {
  if (!/^\d+$/.test(raw)) throw new Error(`--${flag} must be a whole number ≥ 0, got "${raw}"`);
  return Number(raw);
}

/** "0-3,8" → [0,1,2,3,8]. */
export function parseCpuList(raw: string): number[] {
  const out: number[] = [];
  for (const part of raw.split(",")) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (!m?.[1]) throw new Error(`--cpus must be a CPU list like 0-3,8, got "${raw}"`);
    const lo = Number(m[1]);
    const hi = m[2] === undefined ? lo : Number(m[2]);
    if (hi < lo || hi - lo > 8192) throw new Error(`--cpus: "${part}" is not an ascending range`);
    for (let c = lo; c <= hi; c++) out.push(c);
  }
  return out;
}

function pairs(flag: string, raw: string[] | undefined): Record<string, string> {
  return Object.fromEntries(
    (raw ?? []).map((l) => {
      const i = l.indexOf("=");
      if (i <= 0) throw new Error(`--${flag} takes key=value, got "${l}"`);
      return [l.slice(0, i), l.slice(i + 1)];
    }),
  );
}

const limitText = (l: LimitFlag, v: bigint | number | undefined) =>
  v === undefined ? "-" : l.bytes ? bytes(v) : String(v);

/** "used/limit" ("-" for no bound of its own). */
function usedOf(n: Node, l: LimitFlag): string {
  const used = n.usage?.[l.usage] ?? 0;
  return `${l.bytes ? bytes(used) : String(used)}/${limitText(l, n.policy?.[l.key])}`;
}

function nodeTable(nodes: Node[]): string {
  return table(
    ["NODE", ...LIMITS.map((l) => l.header), "DESCRIPTION"],
    nodes.map((n) => [n.name.replace(/^nodes\//, ""), ...LIMITS.map((l) => usedOf(n, l)), n.description]),
  );
}

function nodeDetail(n: Node): string {
  const p = n.policy;
  const kv = (r: Record<string, string>) =>
    Object.entries(r)
      .map(([k, v]) => `${k}=${v}`)
      .join(", ") || "-";
  return keyValues([
    ["Name", n.name],
    ["Parent", n.parent || "-"],
    ["Description", n.description || "-"],
    ["Labels", kv(n.labels)],
    ...LIMITS.map((l): [string, string] => [
      l.label,
      `${l.bytes ? bytes(n.usage?.[l.usage] ?? 0) : String(n.usage?.[l.usage] ?? 0)} used of ${
        p?.[l.key] === undefined ? "no bound of its own" : limitText(l, p[l.key])
      }`,
    ]),
    ["Networks", p?.allowedNetworks.join(", ") || "any"],
    ["Host labels", kv(p?.allowedHostLabels ?? {})],
    ["CPUs", p?.allowedCpus.length ? cpuList(p.allowedCpus) : "any"],
    ["Created", n.createTime ? timestampDate(n.createTime).toISOString() : "-"],
    ["Updated", n.updateTime ? timestampDate(n.updateTime).toISOString() : "-"],
    ["Etag", n.etag],
  ]);
}

/** Policy flags → (policy, the update_mask paths they name). */
function policyFromFlags(o: Record<string, unknown>): { policy: Policy; paths: string[] } {
  const policy = create(PolicySchema, {});
  const paths: string[] = [];
  for (const l of LIMITS) {
    const camel = l.flag.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
    const raw = o[camel] as string | undefined;
    const clear = o[`clear${camel.charAt(0).toUpperCase()}${camel.slice(1)}`] as boolean | undefined;
    if (raw !== undefined && clear)
      throw new Error(`--${l.flag} and --clear-${l.flag} contradict each other`);
    if (raw !== undefined) {
      // biome-ignore lint/suspicious/noExplicitAny: the key decides number or bigint
      (policy as any)[l.key] = l.bytes ? parseSize(raw) : count(l.flag, raw);
      paths.push(`policy.${l.field}`);
    } else if (clear) paths.push(`policy.${l.field}`);
  }
  if (o.allowNetwork !== undefined) {
    policy.allowedNetworks = (o.allowNetwork as string[]).map((n) =>
      n.startsWith("networks/") ? n : `networks/${n}`,
    );
    paths.push("policy.allowed_networks");
  }
  if (o.hostLabel !== undefined) {
    policy.allowedHostLabels = pairs("host-label", o.hostLabel as string[]);
    paths.push("policy.allowed_host_labels");
  }
  if (o.cpus !== undefined) {
    policy.allowedCpus = o.cpus === "" ? [] : parseCpuList(o.cpus as string);
    paths.push("policy.allowed_cpus");
  }
  return { policy, paths };
}

function policyOptions(c: Command, update: boolean): Command {
  c.option("--max-vms <n>", "most VMs (0: none)")
    .option("--max-vcpus <n>", "most vCPUs, summed over VMs")
    .option("--max-memory <size>", "most guest memory, e.g. 64GiB")
    .option("--max-block <size>", "most block storage, e.g. 1TiB")
    .option("--max-gpus <n>", "most GPUs passed through")
    .option("--max-gpu-memory <size>", "most GPU memory, e.g. 80GiB")
    .option("--allow-network <network...>", "networks VMs may join (default: any the parent allows)")
    .option("--host-label <k=v...>", "labels every host of these VMs must carry")
    .option("--cpus <list>", 'host CPUs the VMs may run on, e.g. "0-3,8"')
    .option("--description <text>", "what the node is for")
    .option("--label <k=v...>", "labels of the node");
  if (update) for (const l of LIMITS) c.option(`--clear-${l.flag}`, `remove the node's own ${l.field} bound`);
  return c;
}

/** `vmenv tree …`: the coordinator's resource tree. */
export function treeCommands(program: Command, cfg: () => ClientConfig, print: Print): void {
  const tree = program
    .command("tree")
    .description("the coordinator's resource tree: delegated quotas by path");
  const client = () => createDaemonClient(ResourceService, cfg());
  const show = (n: Node) => print(toJson(NodeSchema, n), () => nodeDetail(n));

  policyOptions(tree.command("create <path>"), false)
    .description("create a node, e.g. acme/web (its parent must exist; its policy must fit the parent's)")
    .action(async (path: string, o: Record<string, unknown>) => {
      const name = nodeName(path);
      const i = name.lastIndexOf("/");
      const parent = i > "nodes".length ? name.slice(0, i) : "";
      const { policy } = policyFromFlags(o);
      show(
        await client().createNode({
          parent,
          nodeId: name.slice(i + 1),
          node: {
            description: (o.description as string | undefined) ?? "",
            labels: pairs("label", o.label as string[] | undefined),
            policy,
          },
        }),
      );
    });

  tree
    .command("get <path>")
    .description("one node: its policy and the usage of its whole subtree")
    .action(async (path: string) => show(await client().getNode({ name: nodeName(path) })));

  tree
    .command("list [path]")
    .description("the children of a node (the top level by default): usage/limit per resource")
    .option("-r, --recursive", "the whole subtree")
    .action(async (path: string | undefined, o: { recursive?: boolean }) => {
      const nodes: Node[] = [];
      let pageToken = "";
      do {
        const r = await client().listNodes({
          parent: path ? nodeName(path) : "",
          recursive: Boolean(o.recursive),
          pageSize: 1000,
          pageToken,
        });
        nodes.push(...r.nodes);
        pageToken = r.nextPageToken;
      } while (pageToken);
      print({ nodes: nodes.map((n) => toJson(NodeSchema, n)) }, () => nodeTable(nodes));
    });

  policyOptions(tree.command("update <path>"), true)
    .description("change a node's policy, description or labels (only the fields given)")
    .option("--etag <etag>", "fail if the node changed since this etag")
    .action(async (path: string, o: Record<string, unknown>) => {
      const { policy, paths } = policyFromFlags(o);
      if (o.description !== undefined) paths.push("description");
      if (o.label !== undefined) paths.push("labels");
      if (paths.length === 0) throw new Error("nothing to change: give a --max-*, --clear-* or other flag");
      show(
        await client().updateNode({
          node: {
            name: nodeName(path),
            description: (o.description as string | undefined) ?? "",
            labels: pairs("label", o.label as string[] | undefined),
            policy,
            etag: (o.etag as string | undefined) ?? "",
          },
          updateMask: create(FieldMaskSchema, { paths }),
        }),
      );
    });

  tree
    .command("delete <path>")
    .description("delete a node without children, usage or environments")
    .option("--allow-missing", "succeed when it does not exist")
    .option("--etag <etag>", "fail if the node changed since this etag")
    .action(async (path: string, o: { allowMissing?: boolean; etag?: string }) => {
      const name = nodeName(path);
      await client().deleteNode({ name, allowMissing: Boolean(o.allowMissing), etag: o.etag ?? "" });
      print({ deleted: name }, () => `deleted ${name}`);
    });
}
