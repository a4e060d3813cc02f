// The codeExecution tool through the official @google/genai client, unmodified apart from its base URL.
//
//   GEMSERVE_URL=http://127.0.0.1:8080 GEMSERVE_API_KEY=anything node genai_code_execution.mjs
//
// Prints one JSON object: the parts of the answer and the client's own accessors for code and its result;
// exits non-zero on any error. tests/api/test_js_client.py runs it.

import { GoogleGenAI } from "@google/genai";

const ai = new GoogleGenAI({
  apiKey: process.env.GEMSERVE_API_KEY,
  httpOptions: { baseUrl: process.env.GEMSERVE_URL },
});
const response = await ai.models.generateContent({
  model: "gemini-2.5-flash",
  contents: "Use Python to compute the sum of the squares of 1 to 20.",
  config: { tools: [{ codeExecution: {} }], seed: 0, maxOutputTokens: 400 },
});
const parts = response.candidates?.[0]?.content?.parts ?? [];
console.log(JSON.stringify({
  kinds: parts.map((p) => Object.keys(p).find((k) => p[k] !== undefined)),
  parts,
  executableCode: response.executableCode ?? null,
  codeExecutionResult: response.codeExecutionResult ?? null,
  finishReason: response.candidates?.[0]?.finishReason ?? null,
}));
