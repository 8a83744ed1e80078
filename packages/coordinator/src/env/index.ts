/** Environments: records, member kinds with hooks, operation kinds, the collector and the RPC service. */
export { Collector, type CollectorCounters } from "./collector.js";
export { envToPb, packEnvironmentResult } from "./convert.js";
export {
  builtinKinds,
  type MemberKind,
  type PlannedAction,
  planAdd,
  planEvent,
  planRemove,
} from "./kinds.js";
export type { EnvRecord, MemberRecord } from "./model.js";
export { type ClaimRecord, type EnvDeps, environmentKinds } from "./ops.js";
export { type EnvEngine, type EnvServiceDeps, environmentService } from "./rpc.js";
