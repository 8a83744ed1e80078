import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { create, fromJson, type JsonValue, type MessageInitShape, toJson } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import {
  AffinityEnforcement,
  AffinityType,
  type Environment,
  EnvironmentSchema,
  EnvironmentService,
  EnvironmentState,
  MemberSchema,
  MemberState,
  type Operation,
  OperationSchema,
  OperationState,
} from "@vmenv/api/coordinator/v1";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import type { Command } from "commander";
import { awaitOperation } from "./op.js";
import { bytes, keyValues, table } from "./output.js";
import { parseSize } from "./vm.js";

type Print = (json: unknown, text: () => string) => void;

const lower = (s: string | undefined) => (s ?? "?").toLowerCase();
const bare = (name: string) => name.replace(/^[a-z]+\//, "");

/** The environment as a header and a table of its members. */
export function envDetail(e: Environment): string {
  const head = keyValues([
    ["Name", e.name],
    ["Node", e.node],
    ["State", `${lower(EnvironmentState[e.state])}${e.stateMessage ? ` (${e.stateMessage})` : ""}`],
    [
      "Usage",
      e.usage
        ? `${e.usage.vms} VMs, ${e.usage.vcpus} vCPUs, ${bytes(e.usage.memoryBytes)} memory, ${bytes(e.usage.blockBytes)} block`
        : "-",
    ],
    ...(e.lockHolder ? ([["Operation", e.lockHolder]] as [string, string][]) : []),
    ...(e.createTime ? ([["Created", timestampDate(e.createTime).toISOString()]] as [string, string][]) : []),
  ]);
  // Addresses the caller gave or the coordinator chose (NICs on shared networks, docs/adr/0020); the
  // column only appears when some member has one ("-": its agent chooses).
  const addresses = e.members.map(
    (m) =>
      m.spec?.nics
        .map((n) => n.ipAddress)
        .filter(Boolean)
        .join(",") ?? "",
  );
  const withAddresses = addresses.some(Boolean);
  const rows = e.members.map((m, i) => [
    m.id,
    m.role || "-",
    m.kind || "vm",
    lower(MemberState[m.state]),
    m.agent ? bare(m.agent) : "-",
    m.vm ? bare(m.vm) : "-",
    ...(withAddresses ? [addresses[i] || "-"] : []),
    Object.entries(m.outputs)
      .filter(([k]) => k !== "balances")
      .map(([k, v]) => `${k}=${v}`)
      .join(" ") || "",
  ]);
  const header = [
    "MEMBER",
    "ROLE",
    "KIND",
    "STATE",
    "AGENT",
    "VM",
    ...(withAddresses ? ["ADDRESSES"] : []),
    "OUTPUTS",
  ];
  return `${head}\n\n${table(header, rows)}`;
}

function envTable(envs: Environment[]): string {
  return table(
    ["NAME", "NODE", "STATE", "MEMBERS", "VMS"],
    envs.map((e) => [
      bare(e.name),
      bare(e.node),
      lower(EnvironmentState[e.state]),
      String(e.members.length),
      String(e.usage?.vms ?? 0),
    ]),
  );
}

/** Reads a JSON file (the API's JSON form). */
function readJson(file: string): JsonValue {
  const text = readFileSync(file, "utf8");
  try {
    return JSON.parse(text) as JsonValue;
  } catch (err) {
    throw new Error(`${file} is not JSON: ${(err as Error).message}`);
  }
}

interface QuickOptions {
  member?: string[];
  vcpus: string;
  memory: string;
  kernel?: string;
  initrd?: string;
  cmdline: string;
  antiAffinity?: boolean;
}

/** Members from `--member id:role` flags and one spec for all. */
function quickMembers(o: QuickOptions): MessageInitShape<typeof MemberSchema>[] {
  if (!o.member?.length) return [];
  if (!o.kernel) throw new Error("--member needs --kernel (and usually --initrd)");
  const roles = new Set<string>();
  const members = o.member.map((s) => {
    const [id, role = ""] = s.split(":", 2) as [string, string?];
    if (role) roles.add(role);
    return { id, role };
  });
  return members.map(({ id, role }) => ({
    id,
    role,
    spec: {
      vcpus: Number(o.vcpus),
      memoryBytes: parseSize(o.memory),
      boot: {
        method: {
          case: "directKernel" as const,
          value: {
            kernelPath: resolve(o.kernel as string),
            initrdPath: o.initrd ? resolve(o.initrd) : "",
            cmdline: o.cmdline.replaceAll("{id}", id),
          },
        },
      },
    },
    ...(o.antiAffinity && role
      ? {
          placement: {
            affinityRules: [
              { type: AffinityType.ANTI_AFFINITY, enforcement: AffinityEnforcement.SOFT, roles: [role] },
            ],
          },
        }
      : {}),
  }));
}

const nameOf = (id: string) => (id.startsWith("environments/") ? id : `environments/${id}`);

/** `vmenv env …`: environments on the coordinator. */
export function envCommands(program: Command, cfg: () => ClientConfig, print: Print): void {
  const env = program
    .command("env")
    .description("environments on the coordinator (groups of VMs placed on the fleet)");
  const client = () => createDaemonClient(EnvironmentService, cfg());

  /** Waits for the operation (unless --no-wait) and prints its environment, or fails with its error. */
  const finish = async (op: Operation, wait: boolean) => {
    const cur = wait ? await awaitOperation(cfg(), op) : op;
    const e = cur.result ? anyUnpack(cur.result, EnvironmentSchema) : undefined;
    const summary = `${cur.kind} ${cur.target}: ${lower(OperationState[cur.state])} (${cur.name})`;
    if (e) print(toJson(EnvironmentSchema, e), () => `${summary}\n\n${envDetail(e)}`);
    else print(toJson(OperationSchema, cur, { alwaysEmitImplicit: false }), () => summary);
  };

  const quick = (c: Command) =>
    c
      .option("--member <id:role...>", "members, one flag each (quick form, with the spec flags below)")
      .option("--vcpus <n>", "vCPUs of each quick member", "1")
      .option("--memory <size>", "memory of each quick member", "128M")
      .option("--kernel <path>", "kernel each quick member boots")
      .option("--initrd <path>", "initial ramdisk of each quick member")
      .option("--cmdline <text>", "kernel command line ({id} becomes the member id)", "console=ttyS0")
      .option("--anti-affinity", "spread the members of each role over agents (soft rule)");

  quick(
    env
      .command("create <id>")
      .description("create an environment at a tree node, from a JSON file and/or --member flags")
      .option("--node <path>", "tree node, e.g. acme/web (overrides the file's node)")
      .option("-f, --file <file.json>", "the environment in the API's JSON form (node, members …)"),
  )
    .option("--start", "start the members once created")
    .option("--request-id <id>", "for retry-safe replay")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      const e = o.file
        ? fromJson(EnvironmentSchema, readJson(o.file as string))
        : create(EnvironmentSchema, {});
      if (o.node) e.node = (o.node as string).startsWith("nodes/") ? o.node : `nodes/${o.node}`;
      if (!e.node) throw new Error("give the environment's node: --node <path> or node in the file");
      for (const m of quickMembers(o as QuickOptions)) e.members.push(create(MemberSchema, m));
      const op = await client().createEnvironment({
        environmentId: id,
        environment: e,
        start: Boolean(o.start),
        requestId: (o.requestId as string | undefined) ?? "",
      });
      await finish(op, o.wait as boolean);
    });

  env
    .command("get <id>")
    .description("one environment and its members")
    .action(async (id: string) => {
      const e = await client().getEnvironment({ name: nameOf(id) });
      print(toJson(EnvironmentSchema, e), () => envDetail(e));
    });

  env
    .command("list")
    .description("environments")
    .option("--node <path>", "only those at or under this node")
    .action(async (o) => {
      const out: Environment[] = [];
      let pageToken = "";
      do {
        const r = await client().listEnvironments({
          pageToken,
          pageSize: 500,
          node: o.node ? `nodes/${(o.node as string).replace(/^nodes\//, "")}` : "",
        });
        out.push(...r.environments);
        pageToken = r.nextPageToken;
      } while (pageToken);
      print({ environments: out.map((e) => toJson(EnvironmentSchema, e)) }, () => envTable(out));
    });

  env
    .command("delete <id>")
    .description("destroy an environment: its VMs and volumes on every agent")
    .option("--force", "do not ask the guests to shut down")
    .option("--allow-missing", "succeed when it does not exist")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      const op = await client().deleteEnvironment({
        name: nameOf(id),
        force: Boolean(o.force),
        allowMissing: Boolean(o.allowMissing),
      });
      await finish(op, o.wait as boolean);
    });

  for (const [verb, desc] of [
    ["start", "start members, in priority order"],
    ["stop", "stop members, in reverse priority order"],
    ["suspend", "pause members' vCPUs"],
    ["resume", "resume paused members"],
  ] as const) {
    const cmd = env
      .command(`${verb} <id>`)
      .description(desc)
      .option("--member <id...>", "only these members")
      .option("--no-wait", "return the operation at once");
    if (verb === "stop")
      cmd.option("--force", "power off at once").option("--timeout <seconds>", "grace per guest");
    cmd.action(async (id: string, o) => {
      const base = { name: nameOf(id), memberIds: (o.member as string[] | undefined) ?? [] };
      const c = client();
      const op =
        verb === "start"
          ? await c.startEnvironment(base)
          : verb === "stop"
            ? await c.stopEnvironment({
                ...base,
                force: Boolean(o.force),
                ...(o.timeout ? { gracefulTimeout: durationFromMs(Number(o.timeout) * 1000) } : {}),
              })
            : verb === "suspend"
              ? await c.suspendEnvironment(base)
              : await c.resumeEnvironment(base);
      await finish(op, o.wait as boolean);
    });
  }

  quick(
    env
      .command("add-member <id>")
      .description("add a member (from a JSON file of the API's Member, or one --member id:role)")
      .option("-f, --file <file.json>", "the member in the API's JSON form"),
  )
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      const members = o.file
        ? [fromJson(MemberSchema, readJson(o.file as string))]
        : quickMembers(o as QuickOptions).map((m) => create(MemberSchema, m));
      if (members.length !== 1)
        throw new Error("give exactly one member: -f <file.json> or one --member id:role");
      const op = await client().addMember({ name: nameOf(id), member: members[0] });
      await finish(op, o.wait as boolean);
    });

  env
    .command("migrate <id>")
    .description("live-migrate running members to another agent (the members keep running)")
    .option("--member <id...>", "only these members (default: all)")
    .option("--to <agent>", "destination agent (default: the best other agent by placement, per member)")
    .option("--downtime-ms <ms>", "longest pause at switchover (default 300)")
    .option("--bandwidth <size>", "most bytes per second the migration may use, e.g. 100M")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, o) => {
      const to = o.to as string | undefined;
      const op = await client().migrateEnvironment({
        name: nameOf(id),
        memberIds: (o.member as string[] | undefined) ?? [],
        agent: to ? (to.startsWith("agents/") ? to : `agents/${to}`) : "",
        settings: {
          ...(o.downtimeMs ? { downtimeLimit: durationFromMs(Number(o.downtimeMs)) } : {}),
          ...(o.bandwidth ? { maxBandwidthBytesPerSecond: parseSize(o.bandwidth as string) } : {}),
        },
        requestId: randomUUID(),
      });
      await finish(op, o.wait as boolean);
    });

  env
    .command("remove-member <id> <member>")
    .description("remove a member: its kinds' hooks run, then its VM and volumes are destroyed")
    .option("--force", "do not ask the guest to shut down")
    .option("--no-wait", "return the operation at once")
    .action(async (id: string, member: string, o) => {
      const op = await client().removeMember({ name: nameOf(id), memberId: member, force: Boolean(o.force) });
      await finish(op, o.wait as boolean);
    });
}
