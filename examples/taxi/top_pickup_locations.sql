-- The 200 busiest pickup locations (the seed's second model).
SELECT pickup_location_id, trips, fares
FROM pickup_counts
ORDER BY trips DESC, pickup_location_id
LIMIT 200
