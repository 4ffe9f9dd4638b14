-- A filter: long, well-paid trips.
SELECT trip_id, pickup_location_id, dropoff_location_id, trip_distance, fare_amount, country
FROM trips
WHERE trip_distance > 25 AND fare_amount > 60
