// A grpc-js client of the demo's population registry, through a consumer security server.
// It knows nothing of the gateway but the metadata every call carries: the agency's own
// stub (from the provider's .proto) calls each kind of method as it would call the
// provider directly. Prints one JSON document of what each call returned.
//
//   node client.js HOST:PORT PROTO_FILE
"use strict";

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const crypto = require("crypto");

const [target, protoFile] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoFile, { keepCase: true, longs: Number });
const population = grpc.loadPackageDefinition(definition).demo.population.v1;
const client = new population.PopulationRegistry(target, grpc.credentials.createInsecure());

function metadata() {
  const m = new grpc.Metadata();
  m.set("gateway-client", "UY/GOV/MSP/clinics");
  m.set("gateway-service", "UY/GOV/DNIC/identity/population/v1");
  m.set("gateway-purpose", "healthcare-identification");
  return m;
}

const deadline = () => new Date(Date.now() + 20000);

function unary() {
  return new Promise((resolve, reject) => {
    client.GetPerson({ national_id: "1.234.567-8" }, metadata(), { deadline: deadline() },
      (err, person) => (err ? reject(err) : resolve(person.given_name)));
  });
}

function serverStreaming() {
  return new Promise((resolve, reject) => {
    const names = [];
    const call = client.ExportPeople({ born_since: "" }, metadata(), { deadline: deadline() });
    call.on("data", (person) => names.push(person.given_name));
    call.on("error", reject);
    call.on("end", () => resolve(names.sort()));
  });
}

function clientStreaming(payloads) {
  return new Promise((resolve, reject) => {
    const call = client.Upload(metadata(), { deadline: deadline() }, (err, summary) =>
      err ? reject(err) : resolve(summary));
    for (const payload of payloads) call.write({ payload });
    call.end();
  });
}

function bidirectional(count) {
  return new Promise((resolve, reject) => {
    const call = client.Chat(metadata(), { deadline: deadline() });
    const echoed = [];
    let next = 0;
    const send = () => call.write({ payload: Buffer.from(`message ${next++}`) });
    // one message at a time: each is sent once the previous one came back
    call.on("data", (message) => {
      echoed.push(message.payload.toString());
      if (next < count) send(); else call.end();
    });
    call.on("error", reject);
    call.on("end", () => resolve(echoed));
    send();
  });
}

function refused() {
  return new Promise((resolve) => {
    const m = metadata();
    m.set("gateway-purpose", "marketing");
    const call = client.ExportPeople({}, m, { deadline: deadline() });
    call.on("data", () => {});
    call.on("error", (err) => resolve({ code: err.code, error: err.metadata.get("gateway-error")[0] }));
    call.on("end", () => resolve({ code: 0 }));
  });
}

async function main() {
  const payloads = Array.from({ length: 40 }, (_, i) => Buffer.alloc(100 + i, i));
  const result = {
    unary: await unary(),
    server_streaming: await serverStreaming(),
    client_streaming: await clientStreaming(payloads),
    expected_upload_sha256: crypto.createHash("sha256").update(Buffer.concat(payloads)).digest("hex"),
    bidirectional: await bidirectional(10),
    refused: await refused(),
  };
  process.stdout.write(JSON.stringify(result) + "\n");
  client.close();
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
