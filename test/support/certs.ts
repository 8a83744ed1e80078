import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { run } from "./agent.js";

export interface TestPki {
  dir: string;
  caCert: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  /** A client certificate signed by another CA, which the server must refuse. */
  strangerCert: string;
  strangerKey: string;
  read(path: string): Promise<Buffer>;
  remove(): Promise<void>;
}

async function openssl(args: string[]): Promise<void> {
  const r = await run("openssl", args);
  if (r.code !== 0) throw new Error(`openssl ${args.join(" ")} failed: ${r.stderr}`);
}

/** A throwaway CA with a server certificate for 127.0.0.1/localhost and two client certificates. */
export async function makePki(): Promise<TestPki> {
  const dir = await mkdtemp(join(tmpdir(), "vmenv-pki-"));
  const p = (f: string) => join(dir, f);
  const ca = async (name: string) => {
    await openssl([
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-days",
      "2",
      "-subj",
      `/CN=${name}`,
      "-keyout",
      p(`${name}.key`),
      "-out",
      p(`${name}.crt`),
    ]);
  };
  const leaf = async (name: string, issuer: string, ext: string) => {
    await writeFile(p(`${name}.ext`), ext);
    await openssl([
      "req",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:P-256",
      "-nodes",
      "-subj",
      `/CN=${name}`,
      "-keyout",
      p(`${name}.key`),
      "-out",
      p(`${name}.csr`),
    ]);
    await openssl([
      "x509",
      "-req",
      "-in",
      p(`${name}.csr`),
      "-CA",
      p(`${issuer}.crt`),
      "-CAkey",
      p(`${issuer}.key`),
      "-CAcreateserial",
      "-days",
      "2",
      "-out",
      p(`${name}.crt`),
      "-extfile",
      p(`${name}.ext`),
    ]);
  };
  await ca("ca");
  await ca("stranger-ca");
  await leaf("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  await leaf("client", "ca", "extendedKeyUsage=clientAuth\n");
  await leaf("stranger", "stranger-ca", "extendedKeyUsage=clientAuth\n");
  return {
    dir,
    caCert: p("ca.crt"),
    serverCert: p("server.crt"),
    serverKey: p("server.key"),
    clientCert: p("client.crt"),
    clientKey: p("client.key"),
    strangerCert: p("stranger.crt"),
    strangerKey: p("stranger.key"),
    read: (f) => readFile(f),
    remove: () => rm(dir, { recursive: true, force: true }),
  };
}
