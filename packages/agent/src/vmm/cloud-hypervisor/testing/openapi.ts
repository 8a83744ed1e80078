/**
 * Test helper: cloud-hypervisor's published OpenAPI document, loaded as data and turned into validators.
 *
 * The document (`shared/reference/cloud-hypervisor-openapi.yaml`, outside the repository) is found by
 * `$VMENV_CH_OPENAPI` (the file), `$VMENV_REFERENCE_DIR` (its folder), or else by walking up from this
 * file to the first `shared/reference/` that holds it. It is never copied into the project.
 *
 * OpenAPI 3.0 schemas are JSON Schema with a few differences, bridged here: component references
 * (`#/components/schemas/X`) are rewritten to a `definitions` object of one root schema, `nullable` becomes
 * a `null` type, and the integer formats OpenAPI names (`int8` … `uint64`) become range checks.
 *
 * Two modes: `published` validates exactly what the document says. `closed` additionally rejects
 * properties a schema does not declare: the document declares no object closed, so `published` would
 * accept a misspelt field that the VMM then silently ignores (serde skips unknown fields).
 */
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Ajv, type ValidateFunction } from "ajv";
import addFormats from "ajv-formats";
import { parse } from "yaml";

export const CH_OPENAPI_FILE = "cloud-hypervisor-openapi.yaml";

export type SchemaMode = "published" | "closed";

/** One path + method of the document. */
export interface OpenApiOperation {
  /** Lower case, as the document keys it: `get`, `put`. */
  method: string;
  /** As the document keys it, e.g. `/vm.create` (relative to the server URL `/api/v1`). */
  path: string;
  /** Schema of the JSON request body, if the operation takes one. */
  requestSchema: Record<string, unknown> | undefined;
  requestRequired: boolean;
  /** Documented statuses, each with the schema of its JSON body if it has one. */
  responses: Map<number, Record<string, unknown> | undefined>;
}

const ROOT_ID = "urn:vmenv:cloud-hypervisor-openapi";
const REF_PREFIX = "#/components/schemas/";

/** Ranges of the integer formats that OpenAPI documents use and JSON Schema does not define. */
const INTEGER_FORMATS: Record<string, readonly [number, number]> = {
  int8: [-(2 ** 7), 2 ** 7 - 1],
  int16: [-(2 ** 15), 2 ** 15 - 1],
  int32: [-(2 ** 31), 2 ** 31 - 1],
  int64: [-(2 ** 63), 2 ** 63 - 1],
  uint8: [0, 2 ** 8 - 1],
  uint16: [0, 2 ** 16 - 1],
  uint32: [0, 2 ** 32 - 1],
  uint64: [0, 2 ** 64 - 1],
};

/** Where the document is; throws, naming where it looked, when it is nowhere. */
export function findChOpenApiFile(): string {
  const explicit = process.env.VMENV_CH_OPENAPI;
  if (explicit !== undefined && explicit !== "") return explicit;
  const dir = process.env.VMENV_REFERENCE_DIR;
  if (dir !== undefined && dir !== "") return join(dir, CH_OPENAPI_FILE);
  const start = dirname(fileURLToPath(import.meta.url));
  for (let d = start; ; d = dirname(d)) {
    const candidate = join(d, "shared", "reference", CH_OPENAPI_FILE);
    if (existsSync(candidate)) return candidate;
    if (dirname(d) === d) break;
  }
  throw new Error(
    `${CH_OPENAPI_FILE} not found in any shared/reference/ above ${start}; ` +
      "set VMENV_CH_OPENAPI to the file or VMENV_REFERENCE_DIR to its folder",
  );
}

let cached: ChOpenApi | undefined;

/** The document, loaded and compiled once per process. */
export function loadChOpenApi(): ChOpenApi {
  cached ??= new ChOpenApi(findChOpenApiFile());
  return cached;
}

export class ChOpenApi {
  readonly file: string;
  /** Names of the component schemas. */
  readonly schemaNames: readonly string[];
  /** The server URL's path, `/api/v1`. */
  readonly basePath: string;
  readonly #operations = new Map<string, OpenApiOperation>();
  readonly #ajv: Record<SchemaMode, Ajv>;
  readonly #compiled = new Map<string, ValidateFunction>();

  constructor(file: string) {
    this.file = file;
    const doc = asObject(parse(readFileSync(file, "utf8")), "document");
    const servers = doc.servers;
    const url = Array.isArray(servers) ? asObject(servers[0], "servers[0]").url : undefined;
    this.basePath = typeof url === "string" ? new URL(url).pathname.replace(/\/$/, "") : "";
    const schemas = asObject(asObject(doc.components, "components").schemas, "components.schemas");
    this.schemaNames = Object.keys(schemas);

    const make = (mode: SchemaMode): Ajv => {
      const ajv = new Ajv({ strict: true, allErrors: true });
      addFormats.default(ajv);
      for (const [name, [min, max]] of Object.entries(INTEGER_FORMATS)) {
        ajv.addFormat(name, {
          type: "number",
          validate: (n: number) => Number.isInteger(n) && n >= min && n <= max,
        });
      }
      const definitions: Record<string, unknown> = {};
      for (const [name, schema] of Object.entries(schemas)) definitions[name] = toJsonSchema(schema, mode);
      ajv.addSchema({ $id: ROOT_ID, definitions });
      return ajv;
    };
    this.#ajv = { published: make("published"), closed: make("closed") };

    for (const [path, item] of Object.entries(asObject(doc.paths, "paths"))) {
      for (const [method, op] of Object.entries(asObject(item, path))) {
        const operation = asObject(op, `${path} ${method}`);
        const requestBody = operation.requestBody as Record<string, unknown> | undefined;
        const responses = new Map<number, Record<string, unknown> | undefined>();
        for (const [code, response] of Object.entries(asObject(operation.responses, `${path} responses`))) {
          responses.set(Number(code), jsonSchemaOf(response));
        }
        this.#operations.set(`${method.toLowerCase()} ${path}`, {
          method: method.toLowerCase(),
          path,
          requestSchema: jsonSchemaOf(requestBody),
          requestRequired: requestBody?.required === true,
          responses,
        });
      }
    }
  }

  /** The operation at `path` (relative to `/api/v1`) for `method` (any case), if documented. */
  operation(method: string, path: string): OpenApiOperation | undefined {
    return this.#operations.get(`${method.toLowerCase()} ${path}`);
  }

  operations(): OpenApiOperation[] {
    return [...this.#operations.values()];
  }

  /** Documented 2xx statuses of an operation, ascending. */
  successStatuses(op: OpenApiOperation): number[] {
    return [...op.responses.keys()].filter((s) => s >= 200 && s < 300).sort((a, b) => a - b);
  }

  /** Validates a value against a component schema by name; the list of problems, empty when valid. */
  validate(schemaName: string, value: unknown, mode: SchemaMode = "closed"): string[] {
    if (!this.schemaNames.includes(schemaName)) throw new Error(`no component schema ${schemaName}`);
    return this.validateWith({ $ref: REF_PREFIX + schemaName }, value, mode);
  }

  /** Validates a request body against what the document declares for the operation. */
  validateRequest(method: string, path: string, body: unknown, mode: SchemaMode = "closed"): string[] {
    const op = this.operation(method, path);
    if (op === undefined) return [`${method.toUpperCase()} ${path} is not in the document`];
    if (op.requestSchema === undefined) {
      return body === undefined ? [] : [`${method.toUpperCase()} ${path} takes no request body`];
    }
    if (body === undefined) return op.requestRequired ? [`${method.toUpperCase()} ${path} needs a body`] : [];
    return this.validateWith(op.requestSchema, body, mode);
  }

  /** Validates an answer: its status must be documented, and its JSON body must fit that status's schema. */
  validateResponse(
    method: string,
    path: string,
    status: number,
    body: unknown,
    mode: SchemaMode = "closed",
  ): string[] {
    const op = this.operation(method, path);
    if (op === undefined) return [`${method.toUpperCase()} ${path} is not in the document`];
    if (!op.responses.has(status))
      return [`status ${status} is not documented for ${method.toUpperCase()} ${path}`];
    const schema = op.responses.get(status);
    if (schema === undefined) return body === undefined ? [] : [`status ${status} documents no body`];
    return this.validateWith(schema, body, mode);
  }

  validateWith(openApiSchema: Record<string, unknown>, value: unknown, mode: SchemaMode): string[] {
    const key = `${mode} ${JSON.stringify(openApiSchema)}`;
    let validate = this.#compiled.get(key);
    if (validate === undefined) {
      validate = this.#ajv[mode].compile(toJsonSchema(openApiSchema, mode) as object);
      this.#compiled.set(key, validate);
    }
    if (validate(value)) return [];
    return (validate.errors ?? []).map((e) => {
      const where = e.instancePath === "" ? "body" : `body${e.instancePath}`;
      const extra = e.keyword === "additionalProperties" ? ` (${String(e.params.additionalProperty)})` : "";
      return `${where} ${e.message ?? e.keyword}${extra}`;
    });
  }
}

function jsonSchemaOf(container: unknown): Record<string, unknown> | undefined {
  if (typeof container !== "object" || container === null) return undefined;
  const content = (container as Record<string, unknown>).content;
  if (typeof content !== "object" || content === null) return undefined;
  const json = (content as Record<string, unknown>)["application/json"];
  if (typeof json !== "object" || json === null) return undefined;
  const schema = (json as Record<string, unknown>).schema;
  return typeof schema === "object" && schema !== null ? (schema as Record<string, unknown>) : undefined;
}

/** Keywords whose value is a schema, a list of schemas, or a map of names to schemas. */
const SCHEMA_KEYWORDS = new Set(["items", "additionalProperties", "not"]);
const SCHEMA_LIST_KEYWORDS = new Set(["allOf", "anyOf", "oneOf"]);
const SCHEMA_MAP_KEYWORDS = new Set(["properties"]);
/** OpenAPI-only annotations JSON Schema does not know. */
const DROPPED_KEYWORDS = new Set(["nullable", "example", "xml", "externalDocs", "discriminator"]);

/** An OpenAPI 3.0 schema as a JSON Schema (draft-07) that refers into the root schema's `definitions`. */
function toJsonSchema(node: unknown, mode: SchemaMode): unknown {
  if (typeof node !== "object" || node === null || Array.isArray(node)) return node;
  const schema = node as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(schema)) {
    if (DROPPED_KEYWORDS.has(key)) continue;
    if (key === "$ref" && typeof value === "string") {
      if (!value.startsWith(REF_PREFIX)) throw new Error(`unsupported reference ${value}`);
      out.$ref = `${ROOT_ID}#/definitions/${value.slice(REF_PREFIX.length)}`;
    } else if (SCHEMA_KEYWORDS.has(key) && typeof value === "object") {
      out[key] = toJsonSchema(value, mode);
    } else if (SCHEMA_LIST_KEYWORDS.has(key) && Array.isArray(value)) {
      out[key] = value.map((v) => toJsonSchema(v, mode));
    } else if (SCHEMA_MAP_KEYWORDS.has(key) && typeof value === "object" && value !== null) {
      out[key] = Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toJsonSchema(v, mode)]));
    } else {
      out[key] = value;
    }
  }
  if (schema.nullable === true) {
    if (typeof out.type === "string") out.type = [out.type, "null"];
    if (Array.isArray(out.enum)) out.enum = [...out.enum, null];
  }
  if (mode === "closed" && out.properties !== undefined && out.additionalProperties === undefined) {
    out.additionalProperties = false;
  }
  return out;
}

function asObject(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Error(`OpenAPI document: ${what} is not an object`);
  }
  return value as Record<string, unknown>;
}
