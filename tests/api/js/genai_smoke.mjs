// Drives a gemserve server with the official @google/genai client, unmodified apart from its base URL.
//
//   GEMSERVE_URL=http://127.0.0.1:8080 GEMSERVE_API_KEY=anything [GEMSERVE_API_VERSION=v1beta] node genai_smoke.mjs
//
// Without GEMSERVE_API_VERSION the client's own default API version is used (v1 in @google/genai 3.x).
// Prints one JSON object with what came back; exits non-zero on any error. tests/api/test_js_client.py runs it.

import { GoogleGenAI } from "@google/genai";

const MODEL = "gemma-3-270m";
const CONFIG = { maxOutputTokens: 8, temperature: 0 };

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

function candidateOf(response) {
  const candidate = response.candidates?.[0];
  if (!candidate) {
    throw new Error(`no candidate in ${JSON.stringify(response)}`);
  }
  return candidate;
}

function summary(response) {
  const candidate = candidateOf(response);
  return {
    text: response.text ?? null,
    finishReason: candidate.finishReason ?? null,
    index: candidate.index ?? null,
    role: candidate.content?.role ?? null,
    usage: response.usageMetadata ?? null,
    modelVersion: response.modelVersion ?? null,
    responseId: response.responseId ?? null,
  };
}

async function main() {
  const baseUrl = required("GEMSERVE_URL");
  const apiKey = required("GEMSERVE_API_KEY");
  const httpOptions = { baseUrl };
  if (process.env.GEMSERVE_API_VERSION) {
    httpOptions.apiVersion = process.env.GEMSERVE_API_VERSION;
  }
  const ai = new GoogleGenAI({ apiKey, httpOptions });
  // apiClient is internal to the library: read it only to report which URL the requests went to.
  const out = {
    apiVersion: ai.apiClient?.getApiVersion?.() ?? null,
    requestUrl: ai.apiClient?.getRequestUrl?.() ?? null,
  };

  const prompt = "The capital of France is";
  const whole = await ai.models.generateContent({ model: MODEL, contents: prompt, config: CONFIG });
  out.generate = summary(whole);

  const chunks = [];
  const stream = await ai.models.generateContentStream({ model: MODEL, contents: prompt, config: CONFIG });
  for await (const chunk of stream) {
    chunks.push(chunk);
  }
  if (chunks.length === 0) {
    throw new Error("the stream yielded no chunks");
  }
  const last = chunks[chunks.length - 1];
  out.stream = {
    chunks: chunks.length,
    texts: chunks.map((c) => c.text ?? ""),
    text: chunks.map((c) => c.text ?? "").join(""),
    finishReason: candidateOf(last).finishReason ?? null,
    finishReasons: chunks.map((c) => c.candidates?.[0]?.finishReason ?? null),
    usage: last.usageMetadata ?? null,
    modelVersion: last.modelVersion ?? null,
  };

  const counted = await ai.models.countTokens({ model: MODEL, contents: prompt });
  out.countTokens = { totalTokens: counted.totalTokens ?? null };

  const model = await ai.models.get({ model: MODEL });
  out.get = {
    name: model.name ?? null,
    displayName: model.displayName ?? null,
    inputTokenLimit: model.inputTokenLimit ?? null,
    outputTokenLimit: model.outputTokenLimit ?? null,
    supportedActions: model.supportedActions ?? null,
    temperature: model.temperature ?? null,
    topP: model.topP ?? null,
    topK: model.topK ?? null,
  };

  const names = [];
  const pager = await ai.models.list();
  for await (const listed of pager) {
    names.push(listed.name);
  }
  out.list = names;

  const chat = ai.chats.create({ model: MODEL, config: CONFIG });
  const first = await chat.sendMessage({ message: "My name is Ada." });
  const second = await chat.sendMessage({ message: "What is my name?" });
  out.chat = {
    first: summary(first),
    second: summary(second),
    historyRoles: chat.getHistory().map((c) => c.role),
  };

  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((error) => {
  const detail = { name: error?.name, message: error?.message, status: error?.status, stack: error?.stack };
  process.stderr.write(`genai_smoke failed: ${JSON.stringify(detail, null, 2)}\n`);
  process.exit(1);
});
