import { type DescFile, type DescMessage, type DescService, toBinary } from "@bufbuild/protobuf";
import type { GenFile } from "@bufbuild/protobuf/codegenv2";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, type ServiceImpl } from "@connectrpc/connect";
import { ServerReflection as ReflectionV1 } from "@vmenv/api/grpc/reflection/v1";
import { ServerReflection as ReflectionV1alpha } from "@vmenv/api/grpc/reflection/v1alpha";

/** The request of either reflection version; both have the same shape. */
type Request = {
  host: string;
  messageRequest:
    | {
        case: "fileByFilename" | "fileContainingSymbol" | "allExtensionNumbersOfType" | "listServices";
        value: string;
      }
    | { case: "fileContainingExtension"; value: { containingType: string; extensionNumber: number } }
    | { case: undefined; value?: undefined };
};

/**
 * An index of every file descriptor a server knows (its services' files and all their imports), by file
 * name and by fully qualified symbol, answering grpc.reflection requests.
 */
export class DescriptorIndex {
  readonly #files = new Map<string, DescFile>();
  readonly #symbols = new Map<string, DescFile>();
  /** containing type → extension number → file */
  readonly #extensions = new Map<string, Map<number, DescFile>>();
  readonly #encoded = new Map<string, Uint8Array>();
  readonly services: readonly string[];

  constructor(files: readonly (GenFile | DescFile)[], services: readonly DescService[]) {
    for (const f of files) this.#addFile(f);
    for (const s of services) this.#addFile(s.file);
    this.services = [...new Set(services.map((s) => s.typeName))].sort();
  }

  #addFile(file: DescFile): void {
    if (this.#files.has(file.proto.name)) return;
    this.#files.set(file.proto.name, file);
    for (const dep of file.dependencies) this.#addFile(dep);
    const addMessage = (m: DescMessage) => {
      this.#symbols.set(m.typeName, file);
      for (const f of m.fields) this.#symbols.set(`${m.typeName}.${f.name}`, file);
      for (const n of m.nestedMessages) addMessage(n);
      for (const e of m.nestedEnums) this.#symbols.set(e.typeName, file);
      for (const x of m.nestedExtensions) this.#addExtension(x.extendee.typeName, x.number, x.typeName, file);
    };
    for (const m of file.messages) addMessage(m);
    for (const e of file.enums) this.#symbols.set(e.typeName, file);
    for (const s of file.services) {
      this.#symbols.set(s.typeName, file);
      for (const m of s.methods) this.#symbols.set(`${s.typeName}.${m.name}`, file);
    }
    for (const x of file.extensions) this.#addExtension(x.extendee.typeName, x.number, x.typeName, file);
  }

  #addExtension(extendee: string, number: number, typeName: string, file: DescFile): void {
    this.#symbols.set(typeName, file);
    const byNumber = this.#extensions.get(extendee) ?? new Map<number, DescFile>();
    this.#extensions.set(extendee, byNumber);
    byNumber.set(number, file);
  }

  /** The serialized FileDescriptorProto of `file` followed by those of its imports not yet `sent`. */
  #withDeps(file: DescFile, sent: Set<string>): Uint8Array[] {
    const out: Uint8Array[] = [];
    const visit = (f: DescFile) => {
      if (sent.has(f.proto.name)) return;
      sent.add(f.proto.name);
      const bytes = this.#encoded.get(f.proto.name) ?? toBinary(FileDescriptorProtoSchema, f.proto);
      this.#encoded.set(f.proto.name, bytes);
      out.push(bytes);
      for (const d of f.dependencies) visit(d);
    };
    visit(file);
    return out;
  }

  /** Answers one reflection request; `sent` holds the files already sent on this stream. */
  answer(req: Request, sent: Set<string>) {
    const error = (errorCode: Code, errorMessage: string) =>
      ({ case: "errorResponse", value: { errorCode, errorMessage } }) as const;
    const files = (file: DescFile | undefined, what: string) => {
      if (!file) return error(Code.NotFound, `${what} not found`);
      // A file the client asked for again is sent again, even if sent before on this stream.
      sent.delete(file.proto.name);
      return {
        case: "fileDescriptorResponse",
        value: { fileDescriptorProto: this.#withDeps(file, sent) },
      } as const;
    };
    const r = req.messageRequest;
    const messageResponse = (() => {
      switch (r.case) {
        case "listServices":
          return {
            case: "listServicesResponse",
            value: { service: this.services.map((name) => ({ name })) },
          } as const;
        case "fileByFilename":
          return files(this.#files.get(r.value), `file "${r.value}"`);
        case "fileContainingSymbol":
          return files(this.#symbols.get(r.value.replace(/^\./, "")), `symbol "${r.value}"`);
        case "fileContainingExtension":
          return files(
            this.#extensions.get(r.value.containingType)?.get(r.value.extensionNumber),
            `extension ${r.value.extensionNumber} of "${r.value.containingType}"`,
          );
        case "allExtensionNumbersOfType": {
          if (!this.#symbols.has(r.value)) return error(Code.NotFound, `type "${r.value}" not found`);
          const numbers = [...(this.#extensions.get(r.value)?.keys() ?? [])].sort((a, b) => a - b);
          return {
            case: "allExtensionNumbersResponse",
            value: { baseTypeName: r.value, extensionNumber: numbers },
          } as const;
        }
        default:
          return error(
            Code.InvalidArgument,
            "empty reflection request: set one of its message_request fields",
          );
      }
    })();
    return { validHost: req.host, originalRequest: req, messageResponse };
  }
}

/** grpc.reflection.v1 and v1alpha over one index, so grpcurl and `buf curl` work without proto files. */
export function reflectionServices(index: DescriptorIndex): {
  v1: ServiceImpl<typeof ReflectionV1>;
  v1alpha: ServiceImpl<typeof ReflectionV1alpha>;
} {
  return {
    v1: {
      async *serverReflectionInfo(requests) {
        const sent = new Set<string>();
        for await (const req of requests) yield index.answer(req, sent);
      },
    },
    v1alpha: {
      async *serverReflectionInfo(requests) {
        const sent = new Set<string>();
        for await (const req of requests) yield index.answer(req, sent);
      },
    },
  };
}

export { ReflectionV1, ReflectionV1alpha };
