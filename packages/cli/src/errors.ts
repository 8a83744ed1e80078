import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema } from "@vmenv/api/google/rpc";

/** Code.NotFound → "NOT_FOUND", as gRPC documents it. */
export function codeName(code: Code): string {
  return (Code[code] ?? "UNKNOWN").replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/**
 * One line for any failure: `vmenv: NOT_FOUND: vm vms/x not found (reason VM_NOT_FOUND, vm=vms/x)`.
 * Field violations follow on their own lines.
 */
export function describeError(err: unknown): string {
  if (!(err instanceof ConnectError)) return `vmenv: ${err instanceof Error ? err.message : String(err)}`;
  const [info] = err.findDetails(ErrorInfoSchema);
  const extra = info
    ? ` (reason ${info.reason}${Object.entries(info.metadata)
        .map(([k, v]) => `, ${k}=${v}`)
        .join("")})`
    : "";
  const lines = [`vmenv: ${codeName(err.code)}: ${err.rawMessage}${extra}`];
  for (const br of err.findDetails(BadRequestSchema)) {
    for (const v of br.fieldViolations) {
      if (!err.rawMessage.includes(v.description)) lines.push(`  ${v.field}: ${v.description}`);
    }
  }
  return lines.join("\n");
}
