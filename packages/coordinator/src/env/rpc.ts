/**
 * EnvironmentService: checks requests completely before anything starts (INVALID_ARGUMENT with every
 * offending field, NOT_FOUND for an unknown node, and — by a dry run of hooks, placement, the tree's
 * quota check and the addresses on shared networks — NO_AGENT_FITS, QUOTA_EXCEEDED, IP_ADDRESS_IN_USE,
 * NETWORK_FULL or NETWORK_MISMATCH), then starts the operation kind (ops.ts) and returns the operation.
 */

import { toJson } from "@bufbuild/protobuf";
import { durationMs } from "@bufbuild/protobuf/wkt";
import { MigrationSettingsSchema } from "@vmenv/api/agent/v1";
import {
  AffinityEnforcement,
  AffinityType,
  EnvironmentService,
  EnvironmentState,
  type Member,
  type Operation,
} from "@vmenv/api/coordinator/v1";
import { bind, noFilter, page, type ServiceBinding } from "@vmenv/rpc";
import { alreadyExists, type FieldViolation, invalidArgument, notFound, VmenvError } from "@vmenv/rpc/errors";
import type { OpRecord } from "../ops/types.js";
import { keys } from "../store/keys.js";
import type { JsonValue } from "../store/store.js";
import { assignAddresses } from "./addresses.js";
import { envToPb, fingerprint, memberFromPb } from "./convert.js";
import { builtinKinds, planAdd } from "./kinds.js";
import { MIGRATE_KIND, type MigrateInput, selectMembers } from "./migrate.js";
import {
  AGENT_ID_MAX,
  ENV_ID,
  type EnvRecord,
  envState,
  envUsage,
  MEMBER_ID,
  type MemberRecord,
  VOLUME_ID,
  vmId,
  volumeId,
} from "./model.js";
import type {
  AddMemberInput,
  CreateInput,
  DeleteInput,
  EnvDeps,
  MembersInput,
  RemoveMemberInput,
} from "./ops.js";
import { placeMembers, readEnv } from "./ops.js";

/** The operation engine as the service uses it. */
export interface EnvEngine {
  start(
    kind: string,
    target: string,
    input: OpRecord["input"],
    opts?: { requestId?: string },
  ): Promise<OpRecord>;
  get(id: string): Promise<OpRecord>;
}

export interface EnvServiceDeps extends EnvDeps {
  engine: EnvEngine;
  /** The API's Operation for a record (the OperationService's conversion). */
  toOperation(op: OpRecord): Operation;
}

const MIB = 1024n * 1024n;

/** `environments/{id}` → id, or INVALID_ARGUMENT naming the field. */
export function envIdFromName(name: string, field = "name"): string {
  const m = /^environments\/(.+)$/.exec(name);
  if (!m?.[1] || !ENV_ID.test(m[1]))
    throw invalidArgument(
      field,
      `"${name.slice(0, 80)}" is not an environment name (environments/{id})`,
      "INVALID_ENVIRONMENT_NAME",
    );
  return m[1];
}

function invalid(violations: FieldViolation[]): VmenvError {
  const first = violations[0] as FieldViolation;
  return new VmenvError(
    "invalid-argument",
    `invalid ${first.field}: ${first.description}${violations.length > 1 ? ` (and ${violations.length - 1} more)` : ""}`,
    { reason: "INVALID_ARGUMENT", metadata: { field: first.field }, fieldViolations: violations },
  );
}

/**
 * Checks members given by a caller (`field` is the path of the list, e.g. `environment.members`);
 * `others` are members already in the environment (for uniqueness and affinity references). Returns
 * the violations.
 */
export function checkMembers(
  env: string,
  members: Member[],
  field: (i: number) => string,
  others: ReadonlyArray<Pick<MemberRecord, "id" | "role">> = [],
): FieldViolation[] {
  const out: FieldViolation[] = [];
  const bad = (f: string, description: string) => out.push({ field: f, description });
  const ids = new Set(others.map((m) => m.id));
  const allIds = new Set([...ids, ...members.map((m) => m.id)]);
  const roles = new Set([...others.map((m) => m.role), ...members.map((m) => m.role)].filter(Boolean));
  members.forEach((m, i) => {
    const f = field(i);
    if (!MEMBER_ID.test(m.id))
      bad(
        `${f}.id`,
        `"${m.id.slice(0, 80)}" is not a member id: 1-32 lower-case letters, digits and '-', starting with a letter`,
      );
    else if (ids.has(m.id)) bad(`${f}.id`, `member id "${m.id}" is used twice`);
    else if (vmId(env, m.id).length > AGENT_ID_MAX)
      bad(
        `${f}.id`,
        `VM id "${vmId(env, m.id)}" would be longer than ${AGENT_ID_MAX} characters: use shorter ids`,
      );
    ids.add(m.id);
    if (m.role && !MEMBER_ID.test(m.role))
      bad(`${f}.role`, `"${m.role.slice(0, 80)}" is not a role: use lower-case letters, digits and '-'`);
    if (m.kind && !builtinKinds.has(m.kind))
      bad(
        `${f}.kind`,
        `unknown member kind "${m.kind.slice(0, 80)}" (known: ${[...builtinKinds.keys()].join(", ")})`,
      );
    const s = m.spec;
    if (!s) bad(`${f}.spec`, "is required");
    else {
      if (s.vcpus < 1 || s.vcpus > 255) bad(`${f}.spec.vcpus`, `must be between 1 and 255, got ${s.vcpus}`);
      if (s.maxVcpus !== 0 && (s.maxVcpus < s.vcpus || s.maxVcpus > 255))
        bad(`${f}.spec.max_vcpus`, `must be 0 or between vcpus (${s.vcpus}) and 255, got ${s.maxVcpus}`);
      if (s.memoryBytes < 32n * MIB || s.memoryBytes % MIB !== 0n)
        bad(`${f}.spec.memory_bytes`, `must be a whole number of MiB, at least 32 MiB, got ${s.memoryBytes}`);
      if (s.maxMemoryBytes !== 0n && (s.maxMemoryBytes < s.memoryBytes || s.maxMemoryBytes % MIB !== 0n))
        bad(
          `${f}.spec.max_memory_bytes`,
          `must be 0 or a whole number of MiB at least memory_bytes, got ${s.maxMemoryBytes}`,
        );
      if (!s.boot?.method.case) bad(`${f}.spec.boot`, "is required (a direct kernel or a disk to boot)");
      const vols = new Set(m.volumes.map((v) => v.id));
      s.disks.forEach((d, k) => {
        const vol = /^volumes\/(.+)$/.exec(d.volume)?.[1];
        if (!vol || !vols.has(vol))
          bad(
            `${f}.spec.disks[${k}].volume`,
            `"${d.volume.slice(0, 80)}" must name one of the member's volumes (volumes/{id} of member.volumes)`,
          );
      });
    }
    const seen = new Set<string>();
    m.volumes.forEach((v, j) => {
      const vf = `${f}.volumes[${j}]`;
      if (!VOLUME_ID.test(v.id))
        bad(`${vf}.id`, `"${v.id.slice(0, 80)}" is not a volume id: 1-32 lower-case letters, digits and '-'`);
      else if (seen.has(v.id)) bad(`${vf}.id`, `volume id "${v.id}" is used twice`);
      else if (volumeId(env, m.id, v.id).length > AGENT_ID_MAX)
        bad(
          `${vf}.id`,
          `volume id "${volumeId(env, m.id, v.id)}" would be longer than ${AGENT_ID_MAX} characters: use shorter ids`,
        );
      seen.add(v.id);
      if (v.sizeBytes === 0n && !v.imageUri) bad(`${vf}.size_bytes`, "must be positive for a blank volume");
      if (v.sizeBytes % 512n !== 0n) bad(`${vf}.size_bytes`, `must be a multiple of 512, got ${v.sizeBytes}`);
      if (v.sizeBytes > 1n << 50n) bad(`${vf}.size_bytes`, `${v.sizeBytes} bytes is absurd`);
    });
    const p = m.placement;
    if (p?.agent && !/^agents\/[a-z0-9]([a-z0-9-]*[a-z0-9])?$/.test(p.agent))
      bad(`${f}.placement.agent`, `"${p.agent.slice(0, 80)}" is not an agent name (agents/{id})`);
    p?.affinityRules.forEach((r, k) => {
      const rf = `${f}.placement.affinity_rules[${k}]`;
      if (r.type === AffinityType.UNSPECIFIED) bad(`${rf}.type`, "is required (AFFINITY or ANTI_AFFINITY)");
      if (r.enforcement === AffinityEnforcement.UNSPECIFIED)
        bad(`${rf}.enforcement`, "is required (HARD or SOFT)");
      if (r.memberIds.length === 0 && r.roles.length === 0) bad(rf, "names no member_ids and no roles");
      r.memberIds.forEach((id, n) => {
        if (!allIds.has(id))
          bad(`${rf}.member_ids[${n}]`, `no member "${id.slice(0, 80)}" in the environment`);
      });
      r.roles.forEach((role, n) => {
        if (!roles.has(role)) bad(`${rf}.roles[${n}]`, `no member has role "${role.slice(0, 80)}"`);
      });
      if (r.weight > 100) bad(`${rf}.weight`, `must be between 0 and 100, got ${r.weight}`);
    });
  });
  return out;
}

class DryRun extends Error {}

/**
 * The environment service. `deps.engine` runs the kinds registered with `environmentKinds(deps)`.
 */
export function environmentService(deps: EnvServiceDeps): ServiceBinding {
  const { store, engine } = deps;

  const nodePath = async (name: string, field: string) => {
    const m = /^nodes\/(.+)$/.exec(name);
    if (!m?.[1])
      throw invalidArgument(
        field,
        `"${name.slice(0, 80)}" is not a node name (nodes/{path})`,
        "INVALID_NODE_NAME",
      );
    if (!(await store.get(keys.node(m[1])))) throw notFound("node", name);
    return m[1];
  };

  const mustEnv = async (id: string): Promise<EnvRecord> => {
    const e = await readEnv(store, id);
    if (!e) throw notFound("environment", `environments/${id}`);
    return e;
  };

  const checkMemberIds = (e: EnvRecord, ids: string[], field: string) => {
    ids.forEach((id, i) => {
      if (!e.members.some((m) => m.id === id))
        throw new VmenvError("not-found", `member ${id} not found in environments/${e.id}`, {
          reason: "MEMBER_NOT_FOUND",
          metadata: { environment: `environments/${e.id}`, member: id, field: `${field}[${i}]` },
        });
    });
  };

  /**
   * Hooks, placement, the tree's quota and the addresses on shared networks, tried without writing
   * anything. `field(i)` is the path of the i-th member of `adding` in the request.
   */
  const dryRun = async (
    env: string,
    node: string,
    existing: MemberRecord[],
    adding: MemberRecord[],
    field: (i: number) => string,
  ) => {
    const plan = planAdd(
      { id: env, node, labels: {}, members: existing },
      adding,
      deps.kinds ?? builtinKinds,
    );
    const placed = await placeMembers(deps, node, plan.added, existing);
    const nicField = (member: string, nic: number) => {
      const i = adding.findIndex((m) => m.id === member);
      return `${i < 0 ? `members[${member}]` : field(i)}.spec.nics[${nic}].ip_address`;
    };
    try {
      await store.transact(async (tx) => {
        await deps.tree.charge(tx, node, envUsage(plan.added));
        await assignAddresses(tx, deps.fleet.views(), env, placed, nicField);
        throw new DryRun();
      });
    } catch (err) {
      if (!(err instanceof DryRun)) throw err;
    }
  };

  const lockHolder = (id: string) => store.get<string>(keys.lock(id));
  /** The operation a request id already started (retry-safe replay answers before any check). */
  const replayed = async (requestId: string): Promise<Operation | undefined> => {
    if (!requestId) return undefined;
    const first = await store.get<string>(keys.opRequest(requestId));
    if (first === undefined) return undefined;
    try {
      return deps.toOperation(await engine.get(first));
    } catch {
      return undefined;
    }
  };
  const op = async (rec: Promise<OpRecord>) => deps.toOperation(await rec);

  return bind(EnvironmentService, {
    async createEnvironment(req) {
      const again = await replayed(req.requestId);
      if (again) return again;
      const violations: FieldViolation[] = [];
      if (!ENV_ID.test(req.environmentId))
        violations.push({
          field: "environment_id",
          description: `"${req.environmentId.slice(0, 80)}" is not an environment id: 1-63 lower-case letters, digits and '-', starting with a letter`,
        });
      const e = req.environment;
      if (!e) violations.push({ field: "environment", description: "is required" });
      else {
        if (!e.node) violations.push({ field: "environment.node", description: "is required" });
        violations.push(...checkMembers(req.environmentId, e.members, (i) => `environment.members[${i}]`));
      }
      if (violations.length > 0) throw invalid(violations);
      const env = e as NonNullable<typeof e>;
      const node = await nodePath(env.node, "environment.node");
      const members = env.members.map(memberFromPb);
      const fp = fingerprint(node, env.description, { ...env.labels }, members);
      const have = await readEnv(store, req.environmentId);
      if (have) {
        if (have.fingerprint !== fp) throw alreadyExists("environment", `environments/${req.environmentId}`);
        try {
          return await op(engine.get(have.createOp));
        } catch {
          // the first operation was pruned: a new one finds the environment there and succeeds
        }
      } else {
        await dryRun(req.environmentId, node, [], members, (i) => `environment.members[${i}]`);
      }
      const input: CreateInput = {
        env: req.environmentId,
        node,
        description: env.description,
        labels: { ...env.labels },
        members,
        start: req.start,
        fingerprint: fp,
      };
      return op(
        engine.start("environment.create", `environments/${req.environmentId}`, input, {
          ...(req.requestId ? { requestId: req.requestId } : {}),
        }),
      );
    },

    async getEnvironment(req) {
      const id = envIdFromName(req.name);
      const e = await mustEnv(id);
      return envToPb(e, await lockHolder(id));
    },

    async listEnvironments(req) {
      noFilter(req.filter, "use node, states and labels");
      let under: string | undefined;
      if (req.node) {
        const m = /^nodes\/(.+)$/.exec(req.node);
        if (!m?.[1])
          throw invalidArgument("node", `"${req.node.slice(0, 80)}" is not a node name (nodes/{path})`);
        under = m[1];
      }
      const states = new Set(req.states);
      const all = (await store.list<EnvRecord>(keys.envPrefix)).map(([, e]) => e);
      const wanted = all.filter(
        (e) =>
          (under === undefined || e.node === under || e.node.startsWith(`${under}/`)) &&
          (states.size === 0 || states.has(EnvironmentState[envState(e).state])) &&
          Object.entries(req.labels).every(([k, v]) => e.labels[k] === v),
      );
      const p = page(wanted, (e) => e.id, req.pageSize, req.pageToken);
      const out = [];
      for (const e of p.items) out.push(envToPb(e, await lockHolder(e.id)));
      return { environments: out, nextPageToken: p.next };
    },

    async deleteEnvironment(req) {
      const again = await replayed(req.requestId);
      if (again) return again;
      const id = envIdFromName(req.name);
      const e = await readEnv(store, id);
      if (!e && !req.allowMissing && !(await lockHolder(id))) throw notFound("environment", req.name);
      const input: DeleteInput = { env: id, force: req.force };
      return op(
        engine.start("environment.delete", `environments/${id}`, input, {
          ...(req.requestId ? { requestId: req.requestId } : {}),
        }),
      );
    },

    async addMember(req) {
      const again = await replayed(req.requestId);
      if (again) return again;
      const id = envIdFromName(req.name);
      if (!req.member) throw invalidArgument("member", "is required");
      const e = await mustEnv(id);
      const violations = checkMembers(id, [req.member], () => "member", e.members);
      if (violations.length > 0) throw invalid(violations);
      const member = memberFromPb(req.member);
      await dryRun(id, e.node, e.members, [member], () => "member");
      const input: AddMemberInput = { env: id, member };
      return op(
        engine.start("environment.add_member", `environments/${id}`, input, {
          ...(req.requestId ? { requestId: req.requestId } : {}),
        }),
      );
    },

    async removeMember(req) {
      const again = await replayed(req.requestId);
      if (again) return again;
      const id = envIdFromName(req.name);
      const e = await mustEnv(id);
      if (!req.memberId) throw invalidArgument("member_id", "is required");
      checkMemberIds(e, [req.memberId], "member_id");
      const input: RemoveMemberInput = { env: id, member: req.memberId, force: req.force };
      return op(
        engine.start("environment.remove_member", `environments/${id}`, input, {
          ...(req.requestId ? { requestId: req.requestId } : {}),
        }),
      );
    },

    async startEnvironment(req) {
      return members("environment.start", req.name, req.memberIds, req.requestId, {});
    },
    async stopEnvironment(req) {
      return members("environment.stop", req.name, req.memberIds, req.requestId, {
        force: req.force,
        ...(req.gracefulTimeout ? { gracefulMs: durationMs(req.gracefulTimeout) } : {}),
      });
    },
    async suspendEnvironment(req) {
      return members("environment.suspend", req.name, req.memberIds, req.requestId, {});
    },
    async resumeEnvironment(req) {
      return members("environment.resume", req.name, req.memberIds, req.requestId, {});
    },

    async migrateEnvironment(req) {
      const again = await replayed(req.requestId);
      if (again) return again;
      const id = envIdFromName(req.name);
      let agent = "";
      if (req.agent) {
        const m = /^agents\/([a-z0-9]([a-z0-9-]*[a-z0-9])?)$/.exec(req.agent);
        if (!m?.[1])
          throw invalidArgument("agent", `"${req.agent.slice(0, 80)}" is not an agent name (agents/{agent})`);
        agent = m[1];
        if (!deps.fleet.views().some((v) => v.id === agent)) throw notFound("agent", req.agent);
      }
      const e = await mustEnv(id);
      checkMemberIds(e, req.memberIds, "member_ids");
      // Refuses members that are not running before anything starts (the operation checks again).
      selectMembers(e, { members: req.memberIds, agent, from: "" });
      const input: MigrateInput = {
        env: id,
        members: [...req.memberIds],
        agent,
        from: "",
        settings: req.settings ? (toJson(MigrationSettingsSchema, req.settings) as JsonValue) : null,
      };
      return op(
        engine.start(MIGRATE_KIND, `environments/${id}`, input, {
          ...(req.requestId ? { requestId: req.requestId } : {}),
        }),
      );
    },
  });

  async function members(
    kind: string,
    name: string,
    ids: string[],
    requestId: string,
    extra: Pick<MembersInput, "force" | "gracefulMs">,
  ) {
    const again = await replayed(requestId);
    if (again) return again;
    const id = envIdFromName(name);
    const e = await mustEnv(id);
    checkMemberIds(e, ids, "member_ids");
    const input: MembersInput = { env: id, members: [...ids], ...extra };
    return op(engine.start(kind, `environments/${id}`, input, requestId ? { requestId } : {}));
  }
}
