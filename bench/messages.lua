-- The harness's request as an Anthropic client sends it (POST /v1/messages): the translated path.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-api-key"] = "sk-bench"
wrk.headers["anthropic-version"] = "2023-06-01"
wrk.body = '{"model":"tiny","messages":[{"role":"user","content":"Write a function that adds two numbers."}],"max_tokens":16}'
