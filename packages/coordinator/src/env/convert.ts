/**
 * Environments between the API (vmenv.coordinator.v1 messages) and the store (model.ts records).
 */
import { create, fromJson, type JsonValue as PbJson, toJson } from "@bufbuild/protobuf";
import { type Any, anyPack, timestampFromMs } from "@bufbuild/protobuf/wkt";
import { VmSpecSchema, VolumeFormat } from "@vmenv/api/agent/v1";
import {
  type Environment,
  EnvironmentSchema,
  EnvironmentState,
  type Member,
  MemberSchema,
  MemberState,
  PlacementSchema,
  ReschedulePolicySchema,
  UsageSchema,
} from "@vmenv/api/coordinator/v1";
import type { Usage } from "../domain/usage.js";
import type { OpRecord } from "../ops/types.js";
import type { JsonValue } from "../store/store.js";
import { type EnvRecord, envState, envUsage, type MemberRecord } from "./model.js";

/** A member as the caller gave it (input fields only), as a PENDING record. */
export function memberFromPb(m: Member): MemberRecord {
  return {
    id: m.id,
    role: m.role,
    kind: m.kind || "vm",
    priority: m.priority,
    spec: m.spec ? (toJson(VmSpecSchema, m.spec) as JsonValue) : {},
    volumes: m.volumes.map((v) => ({
      id: v.id,
      sizeBytes: v.sizeBytes.toString(),
      format: v.format ? (VolumeFormat[v.format] ?? "") : "",
      imageUri: v.imageUri,
      storeLabels: { ...v.storeLabels },
    })),
    placement: m.placement ? (toJson(PlacementSchema, m.placement) as JsonValue) : null,
    reschedulePolicy: m.reschedulePolicy
      ? (toJson(ReschedulePolicySchema, m.reschedulePolicy) as JsonValue)
      : null,
    state: "PENDING",
    stateMessage: "",
    agent: "",
    vm: "",
    outputs: {},
    addedBy: "",
  };
}

export function memberToPb(m: MemberRecord): Member {
  return create(MemberSchema, {
    id: m.id,
    role: m.role,
    kind: m.kind,
    priority: m.priority,
    spec: fromJson(VmSpecSchema, m.spec as PbJson, { ignoreUnknownFields: true }),
    volumes: m.volumes.map((v) => ({
      id: v.id,
      sizeBytes: BigInt(v.sizeBytes || "0"),
      format: v.format ? (VolumeFormat[v.format as keyof typeof VolumeFormat] ?? 0) : 0,
      imageUri: v.imageUri,
      storeLabels: { ...v.storeLabels },
    })),
    ...(m.placement ? { placement: fromJson(PlacementSchema, m.placement as PbJson) } : {}),
    ...(m.reschedulePolicy
      ? { reschedulePolicy: fromJson(ReschedulePolicySchema, m.reschedulePolicy as PbJson) }
      : {}),
    state: MemberState[m.state] ?? MemberState.UNSPECIFIED,
    stateMessage: m.stateMessage,
    agent: m.agent ? `agents/${m.agent}` : "",
    vm: m.vm ? `vms/${m.vm}` : "",
    outputs: { ...m.outputs },
    addedBy: m.addedBy,
  });
}

export function usageToPb(u: Usage) {
  return create(UsageSchema, u);
}

/** The API's Environment for a stored record; `lockHolder` is the operation id holding its lock. */
export function envToPb(e: EnvRecord, lockHolder?: string): Environment {
  const { state, message } = envState(e);
  return create(EnvironmentSchema, {
    name: `environments/${e.id}`,
    node: `nodes/${e.node}`,
    description: e.description,
    labels: { ...e.labels },
    members: e.members.map(memberToPb),
    state: EnvironmentState[state],
    stateMessage: message,
    lockHolder: lockHolder ? `operations/${lockHolder}` : "",
    usage: usageToPb(envUsage(e.members)),
    createTime: timestampFromMs(e.createMs),
    updateTime: timestampFromMs(e.updateMs),
  });
}

/** The environment as an operation's result (protobuf JSON, turned back into an Any by the RPC layer). */
export function envResult(e: EnvRecord): JsonValue {
  return toJson(EnvironmentSchema, envToPb(e)) as JsonValue;
}

/**
 * The result of an environment operation as the API's Any (a vmenv.coordinator.v1.Environment), or
 * undefined when it has none (a delete). For the OperationService's conversion.
 */
export function packEnvironmentResult(op: Pick<OpRecord, "kind" | "result">): Any | undefined {
  if (!op.kind.startsWith("environment.") || op.result === undefined || op.result === null) return undefined;
  if (typeof op.result !== "object" || Array.isArray(op.result) || !("name" in op.result)) return undefined;
  return anyPack(
    EnvironmentSchema,
    fromJson(EnvironmentSchema, op.result as PbJson, { ignoreUnknownFields: true }),
  );
}

/**
 * What makes two creates "the same environment": node, description, labels and the members' input
 * fields, in a canonical JSON form.
 */
export function fingerprint(
  node: string,
  description: string,
  labels: Record<string, string>,
  members: MemberRecord[],
) {
  const sortKeys = (v: unknown): unknown =>
    Array.isArray(v)
      ? v.map(sortKeys)
      : v && typeof v === "object"
        ? Object.fromEntries(
            Object.entries(v as Record<string, unknown>)
              .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
              .map(([k, x]) => [k, sortKeys(x)]),
          )
        : v;
  return JSON.stringify(
    sortKeys({
      node,
      description,
      labels,
      members: members.map((m) => ({
        id: m.id,
        role: m.role,
        kind: m.kind,
        priority: m.priority,
        spec: m.spec,
        volumes: m.volumes,
        placement: m.placement,
        reschedulePolicy: m.reschedulePolicy,
      })),
    }),
  );
}
