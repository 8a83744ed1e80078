/**
 * Typed domain errors. Domain code throws these (it imports nothing else from the RPC world); the error
 * mapper at the RPC edge turns them into a canonical gRPC code with `google.rpc.ErrorInfo` and, for bad
 * fields, `google.rpc.BadRequest`.
 */

/** Canonical status codes a domain error may carry (the gRPC names, lower-kebab). */
export type ErrorCode =
  | "invalid-argument"
  | "not-found"
  | "already-exists"
  | "failed-precondition"
  | "resource-exhausted"
  | "permission-denied"
  | "unauthenticated"
  | "aborted"
  | "out-of-range"
  | "unimplemented"
  | "unavailable"
  | "deadline-exceeded"
  | "cancelled"
  | "internal";

/** One offending field of a request, as `google.rpc.BadRequest.FieldViolation`. */
export interface FieldViolation {
  /** Path of the field, e.g. `vm.spec.memory_bytes`. */
  field: string;
  /** What is wrong with it and what would be right. */
  description: string;
}

export interface VmenvErrorInit {
  /** UPPER_SNAKE reason, stable, e.g. `VM_NOT_FOUND`. */
  reason: string;
  /** Names the elements involved, e.g. `{ vm: "vms/web-1" }`. */
  metadata?: Record<string, string>;
  fieldViolations?: FieldViolation[];
  cause?: unknown;
}

/** A failure a user can act on: its message is sent to the caller as is. */
export class VmenvError extends Error {
  override readonly name = "VmenvError";
  readonly code: ErrorCode;
  readonly reason: string;
  readonly metadata: Readonly<Record<string, string>>;
  readonly fieldViolations: readonly FieldViolation[];

  constructor(code: ErrorCode, message: string, init: VmenvErrorInit) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.code = code;
    this.reason = init.reason;
    this.metadata = init.metadata ?? {};
    this.fieldViolations = init.fieldViolations ?? [];
  }
}

/** A request field is missing or malformed. */
export function invalidArgument(field: string, description: string, reason = "INVALID_ARGUMENT"): VmenvError {
  return new VmenvError("invalid-argument", `invalid ${field}: ${description}`, {
    reason,
    metadata: { field },
    fieldViolations: [{ field, description }],
  });
}

/** A named resource does not exist. `kind` is the resource type (`vm`), `name` its full name. */
export function notFound(kind: string, name: string): VmenvError {
  return new VmenvError("not-found", `${kind} ${name} not found`, {
    reason: `${kind.toUpperCase()}_NOT_FOUND`,
    metadata: { [kind]: name },
  });
}

/** A resource with this name exists with a different spec. */
export function alreadyExists(kind: string, name: string, detail = "with a different spec"): VmenvError {
  return new VmenvError("already-exists", `${kind} ${name} already exists${detail ? ` ${detail}` : ""}`, {
    reason: `${kind.toUpperCase()}_ALREADY_EXISTS`,
    metadata: { [kind]: name },
  });
}

/** The system is not in a state where the request can run (e.g. deleting a volume in use). */
export function failedPrecondition(
  message: string,
  reason: string,
  metadata: Record<string, string> = {},
): VmenvError {
  return new VmenvError("failed-precondition", message, { reason, metadata });
}

/** A feature that is part of the API but not built yet. */
export function unimplemented(what: string, detail: string): VmenvError {
  return new VmenvError("unimplemented", `${what} is not implemented yet: ${detail}`, {
    reason: "NOT_IMPLEMENTED",
    metadata: { method: what },
  });
}
