// Converts the chunks of a DuckDB result into one Arrow array with DuckDB's own Arrow appender,
// sized for their rows exactly: a batch of many vectors gets one buffer per column instead of
// one per 2048 rows (the C API's `duckdb_data_chunk_to_arrow` converts a single chunk).
//
// The SQL worker calls this inside an arena malloc scope, so every buffer the appender
// allocates is born in shareable memory and handed on by reference.
//
// It uses DuckDB's internal C++ API, so it is tied to the pinned DuckDB version, and it must be
// compiled with the same NDEBUG setting as libduckdb-sys (see build.rs).

#include "duckdb.h"
#include "duckdb.hpp"
#include "duckdb/common/arrow/arrow_appender.hpp"
#include "duckdb/function/table/arrow/arrow_duck_schema.hpp"
#include "duckdb/main/capi/capi_internal.hpp"

#include <cstring>
#include <exception>

// `chunks` are `n` (at least one) chunks of the result `options` came from. On success `out`
// owns the array (a struct of the columns); the chunks stay the caller's.
extern "C" duckdb_state quiver_chunks_to_arrow(duckdb_arrow_options options, duckdb_data_chunk *chunks, size_t n,
                                               ArrowArray *out, char *err, size_t err_len) {
	try {
		if (!options || !chunks || n == 0 || !out) {
			throw duckdb::InvalidInputException("quiver_chunks_to_arrow: no chunks");
		}
		auto &props = reinterpret_cast<duckdb::CClientArrowOptionsWrapper *>(options)->properties;
		auto &first = *reinterpret_cast<duckdb::DataChunk *>(chunks[0]);
		duckdb::idx_t rows = 0;
		for (size_t i = 0; i < n; i++) {
			rows += reinterpret_cast<duckdb::DataChunk *>(chunks[i])->size();
		}
		if (!props.client_context) {
			throw duckdb::InvalidInputException("quiver_chunks_to_arrow: options without a client context");
		}
		auto extension_types =
		    duckdb::ArrowTypeExtensionData::GetExtensionTypes(*props.client_context, first.GetTypes());
		duckdb::ArrowAppender appender(first.GetTypes(), rows, props, extension_types);
		for (size_t i = 0; i < n; i++) {
			auto &chunk = *reinterpret_cast<duckdb::DataChunk *>(chunks[i]);
			appender.Append(chunk, 0, chunk.size(), chunk.size());
		}
		*out = appender.Finalize();
	} catch (std::exception &e) {
		if (err && err_len) {
			strncpy(err, e.what(), err_len - 1);
			err[err_len - 1] = 0;
		}
		return DuckDBError;
	}
	return DuckDBSuccess;
}
