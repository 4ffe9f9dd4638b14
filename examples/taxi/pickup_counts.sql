-- Trips counted by pickup location (the seed's first model).
SELECT pickup_location_id, count(*) AS trips, sum(fare_amount) AS fares
FROM trips
GROUP BY pickup_location_id
